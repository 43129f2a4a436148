"""Draft-OPD replay (docs/draft_opd.md correctness checks 3 and 4): the anchor plan from records,
and a
batched replay that rebuilds the drafter's exact inference state at every recorded slot."""

from __future__ import annotations

import pytest
import torch

from draftopd.models.checkpoint import random_drafter_for
from draftopd.models.drafter import Drafter
from draftopd.models.eagle3 import DrafterCache
from draftopd.models.target import TargetModel
from draftopd.speculative.records import Cycle, RolloutRecord
from draftopd.training.data.batches import target_features
from draftopd.training.data.regenerate import Sample
from draftopd.training.opd.replay import (
    SequencePlan,
    anchor_plan,
    anchor_stats,
    collate_plans,
    random_anchor_plan,
    replay_forward,
    replay_parity,
    replay_targets,
)
from draftopd.training.opd.rollouts import make_rollouts

K = 4

# the hand-made example: prompt p0 p1 p2, response A B C D E
P0, P1, P2, A, B, C, D, E, X, Y, W = 40, 41, 42, 50, 51, 52, 53, 54, 60, 61, 62


def _record(cycles: list[Cycle], response: list[int] | None = None) -> RolloutRecord:
    return RolloutRecord(
        job_id="j",
        drafter_version="3",
        target_model="tiny",
        sampling={"temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": None},
        prompt_ids=[P0, P1, P2],
        response_ids=response if response is not None else [A, B, C, D, E],
        cycles=cycles,
        output_len=5,
    )


def _example_cycles() -> list[Cycle]:
    return [
        Cycle(anchor=-1, proposed=[W], accepted=0, committed=[A], rejected_teacher_logprobs=[-3.0]),
        Cycle(  # proposes B x y: accepts B, correction C
            anchor=0,
            proposed=[B, X, Y],
            accepted=1,
            committed=[B, C],
            rejected_teacher_logprobs=[-4.0, -5.0],
        ),
        Cycle(anchor=2, proposed=[D], accepted=1, committed=[D, E], rejected_teacher_logprobs=[]),
    ]


def test_anchor_plan_of_the_hand_made_example() -> None:
    plan = anchor_plan(_record(_example_cycles()))
    assert plan.token_ids == (P0, P1, P2, A, B, C, D, E) and plan.prompt_len == 3
    assert [c.anchor for c in plan.cycles] == [2, 3, 5]  # p2, A, C: absolute positions
    assert [c.accepted for c in plan.cycles] == [0, 1, 1]
    assert [list(c.stream_a_slots) for c in plan.cycles] == [[1], [1, 2], [1]]
    assert [list(c.stream_b_slots) for c in plan.cycles] == [[1], [2, 3], []]

    batch = collate_plans([plan], pad_id=0, num_slots=K)
    assert batch.anchors.tolist() == [[2, 3, 5]]
    assert batch.proposed.tolist() == [[[W, 0, 0, 0], [B, X, Y, 0], [D, 0, 0, 0]]]
    assert batch.stream_a.int().tolist() == [[[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0]]]
    assert batch.stream_b.int().tolist() == [[[1, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]]]
    assert batch.teacher_logprobs.tolist() == [[[-3.0, 0, 0, 0], [0, -4.0, -5.0, 0], [0, 0, 0, 0]]]


def test_replay_targets_of_the_hand_made_example(tiny_target: TargetModel) -> None:
    """Stream-A labels are the target's tokens (B then the correction C after anchor A); stream-B
    labels are the rejected proposals; the target distribution of slot k comes from position
    A+k-1."""

    class Identity(torch.nn.Module):  # d2t = t2d = identity over the whole vocabulary
        def __init__(self, vocab: int) -> None:
            super().__init__()
            self.d2t = torch.arange(vocab)
            self.t2d = torch.arange(vocab)

    batch = collate_plans([anchor_plan(_record(_example_cycles()))], pad_id=0, num_slots=K)
    logits = torch.randn(1, 8, 100)
    targets = replay_targets(logits, batch, Identity(100))  # type: ignore[arg-type]
    assert targets.labels_a[0, 1, :2].tolist() == [B, C]
    assert targets.labels_a[0, 0, 0] == A and targets.labels_a[0, 2, 0] == D
    assert targets.labels_b[0, 1, 1:3].tolist() == [X, Y]
    torch.testing.assert_close(targets.p[0, 1, 1], torch.softmax(logits[0, 4], -1))  # A+2-1


def test_anchor_stats_of_the_hand_made_example() -> None:
    """Anchors 2, 3, 5 of a 5-token response after a 3-token prompt sit at response offsets 0, 1
    and 3 of 0..4; the target's top-1 probability is read at the anchors (which predict slot 1)
    and averaged over the five positions that predict the response (2..6)."""
    batch = collate_plans([anchor_plan(_record(_example_cycles()))], pad_id=0, num_slots=K)
    top1 = torch.tensor([0.9, 0.9, 0.4, 0.5, 0.8, 0.6, 0.7, 0.9])  # per position, over 4 tokens
    probs = torch.stack([torch.tensor([q, (1 - q) / 3, (1 - q) / 3, (1 - q) / 3]) for q in top1])
    stats = anchor_stats(probs.log()[None], batch, [3])
    assert stats["anchor_rel_pos"] == pytest.approx((0 + 1 / 4 + 3 / 4) / 3)
    assert stats["target_top1_anchor"] == pytest.approx((0.4 + 0.5 + 0.6) / 3)
    assert stats["target_top1_response"] == pytest.approx((0.4 + 0.5 + 0.8 + 0.6 + 0.7) / 5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c.__setitem__(1, Cycle(1, [B], 0, [B], [-1.0])), "anchor 1, expected 0"),
        (lambda c: c.__setitem__(2, Cycle(2, [D], 1, [D, A], [])), "do not match the response"),
        (lambda c: c.__setitem__(2, Cycle(2, [D], 0, [D, E], [-1.0])), "accepted 0 of 1 with 2"),
        (lambda c: c.__setitem__(1, Cycle(0, [X, B], 1, [B, C], [-1.0])), "accepted drafts"),
        (lambda c: c.__setitem__(0, Cycle(-1, [W], 0, [A], [])), "0 teacher log-probs for 1"),
        (lambda c: c.pop(), "commit 3 tokens but the response has 5"),
    ],
)
def test_anchor_plan_refuses_inconsistent_records(change: object, message: str) -> None:
    cycles = _example_cycles()
    change(cycles)  # type: ignore[operator]
    with pytest.raises(ValueError, match=message):
        anchor_plan(_record(cycles))


def test_random_anchors_keep_the_block_count_and_teacher_force_the_text() -> None:
    plan = anchor_plan(_record(_example_cycles()))
    shuffled = random_anchor_plan(plan, 3, torch.Generator().manual_seed(0))
    assert len(shuffled.cycles) == 3
    for cycle in shuffled.cycles:
        assert 2 <= cycle.anchor <= 6
        assert cycle.proposed == plan.token_ids[cycle.anchor + 1 : cycle.anchor + 4]
        assert cycle.accepted == len(cycle.proposed) and not list(cycle.stream_b_slots)


# -- replay against real rollouts ------------------------------------------------------------------


@pytest.fixture(scope="module")
def rollouts(
    sharp_target: TargetModel,
    half_trained_drafter: Drafter,
    corpus: tuple[list[Sample], list[list[int]]],
) -> list[RolloutRecord]:
    prompts = [list(s.prompt_ids) for s in corpus[0][:10]]
    return make_rollouts(
        sharp_target, half_trained_drafter, prompts, num_draft_tokens=K, max_new_tokens=32
    )


def _replay(
    target: TargetModel, drafter: Drafter, plans: list[SequencePlan]
) -> tuple[torch.Tensor, object]:
    batch = collate_plans(plans, pad_id=0, num_slots=K)
    features = target_features(target, batch.input_ids, batch.attention_mask).features
    with torch.no_grad():
        return replay_forward(drafter, features, batch), batch


def test_replay_parity_at_the_rollout_weights(
    sharp_target: TargetModel, half_trained_drafter: Drafter, rollouts: list[RolloutRecord]
) -> None:
    """The argmax of the replayed distributions reproduces the recorded proposals on >= 99% of
    slots, accepted and rejected alike: the replay sees what the drafter saw at inference."""
    plans = [anchor_plan(r) for r in rollouts]
    logits, batch = _replay(sharp_target, half_trained_drafter, plans)
    parity = replay_parity(logits, batch, half_trained_drafter)  # type: ignore[arg-type]
    assert parity["slots_accepted"] >= 20 and parity["slots_rejected"] >= 100, parity
    assert parity["parity_accepted"] >= 0.99 and parity["parity_rejected"] >= 0.99, parity


def test_replay_parity_fails_with_other_weights(
    sharp_target: TargetModel, rollouts: list[RolloutRecord]
) -> None:
    """Replaying with a drafter other than the rollout's one breaks parity (the check can fail)."""
    other = random_drafter_for(sharp_target, seed=1, draft_vocab_size=96).float()
    logits, batch = _replay(sharp_target, other, [anchor_plan(r) for r in rollouts])
    parity = replay_parity(logits, batch, other)  # type: ignore[arg-type]
    assert parity["parity_rejected"] is not None and parity["parity_rejected"] < 0.5, parity


def _naive_slots(
    drafter: Drafter, features: torch.Tensor, ids: list[int], anchor: int, drafts: list[int]
) -> list[torch.Tensor]:
    """Draft from ``anchor`` like ``Eagle3Proposer``, one entry at a time, feeding ``drafts``."""
    cache = DrafterCache()
    out = drafter(
        drafter.project(features[None, :anchor]),
        torch.tensor([ids[1 : anchor + 1]]),
        torch.arange(anchor)[None],
        cache=cache,
    )
    slots = [out.logits[0, -1]]
    for s, token in enumerate(drafts[:-1]):
        out = drafter(
            out.hidden[:, -1:], torch.tensor([[token]]), torch.tensor([[anchor + s]]), cache=cache
        )
        slots.append(out.logits[0, -1])
    return slots


def test_replay_equals_step_by_step_drafting_and_does_not_depend_on_the_batch(
    sharp_target: TargetModel, half_trained_drafter: Drafter, rollouts: list[RolloutRecord]
) -> None:
    plans = [anchor_plan(r) for r in rollouts[:3]]
    batched, _ = _replay(sharp_target, half_trained_drafter, plans)
    for row, plan in enumerate(plans):
        alone, _ = _replay(sharp_target, half_trained_drafter, [plan])
        features = target_features(
            sharp_target, torch.tensor([plan.token_ids]), torch.ones(1, len(plan.token_ids))
        ).features[0]
        for c, cycle in enumerate(plan.cycles[:8]):
            if not cycle.proposed:
                continue
            with torch.no_grad():
                naive = _naive_slots(
                    half_trained_drafter,
                    features,
                    list(plan.token_ids),
                    cycle.anchor,
                    list(cycle.proposed),
                )
            for k, expected in enumerate(naive):
                torch.testing.assert_close(batched[row, c, k], expected, atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(alone[0, c, k], expected, atol=1e-4, rtol=1e-4)
