"""Verification is a pure function of tensors: hand-computed cases."""

from __future__ import annotations

import torch

from draftopd.speculative.sampling import SamplingParams, probs_from_logits
from draftopd.speculative.verify import verify_greedy, verify_sampling


def _logits(rows: list[int], vocab: int = 6) -> torch.Tensor:
    out = torch.zeros(len(rows), vocab)
    out[torch.arange(len(rows)), torch.tensor(rows)] = 5.0
    return out


def test_greedy_accepts_the_matching_prefix_and_takes_the_correction() -> None:
    verdict = verify_greedy(torch.tensor([1, 2, 3]), _logits([1, 2, 4, 5]))
    assert (verdict.accepted, verdict.bonus) == (2, 4)
    all_ok = verify_greedy(torch.tensor([1, 2, 3]), _logits([1, 2, 3, 5]))
    assert (all_ok.accepted, all_ok.bonus) == (3, 5)
    none = verify_greedy(torch.tensor([0]), _logits([1, 2]))
    assert (none.accepted, none.bonus) == (0, 1)
    plain = verify_greedy(torch.tensor([], dtype=torch.long), _logits([3]))
    assert (plain.accepted, plain.bonus) == (0, 3)


def test_sampling_rejects_impossible_drafts_and_resamples_from_the_residual() -> None:
    p = torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        verdict = verify_sampling(torch.tensor([3]), p, q, g)
        assert verdict.accepted == 0 and verdict.bonus in (1, 2)


def test_sampling_accepts_when_p_dominates_q() -> None:
    p = torch.tensor([[0.1, 0.9, 0.0], [0.0, 0.0, 1.0]])
    q = torch.tensor([[0.5, 0.5, 0.0]])
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        verdict = verify_sampling(torch.tensor([1]), p, q, g)
        assert (verdict.accepted, verdict.bonus) == (1, 2)


def test_one_hot_q_residual_excludes_the_rejected_draft() -> None:
    p = torch.tensor([[0.3, 0.7], [0.5, 0.5]])
    g = torch.Generator().manual_seed(1)
    outcomes = {verify_sampling(torch.tensor([0]), p, None, g) for _ in range(200)}
    assert {(v.accepted, v.bonus) for v in outcomes if v.accepted == 0} == {(0, 1)}
    assert any(v.accepted == 1 for v in outcomes)


def test_top_k_top_p_and_temperature() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    top2 = probs_from_logits(logits, SamplingParams(temperature=1.0, top_k=2))
    torch.testing.assert_close(top2, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    nucleus = probs_from_logits(logits, SamplingParams(temperature=1.0, top_p=0.7))
    torch.testing.assert_close(nucleus, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    cold = probs_from_logits(logits, SamplingParams(temperature=0.5))
    torch.testing.assert_close(cold, torch.softmax(logits / 0.5, dim=-1))
