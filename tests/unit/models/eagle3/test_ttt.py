"""Training-time test: the batched unroll equals drafting step by step from every anchor."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from draftopd.models.eagle3.model import Eagle3Config, Eagle3Drafter, random_drafter
from draftopd.models.eagle3.ttt import (
    naive_ttt_logits,
    step_attention_mask,
    ttt_loss_from_logits,
    ttt_unroll,
)
from draftopd.models.target import TargetModel
from draftopd.training.data.batches import collate, target_features
from draftopd.training.data.regenerate import Sample

STEPS = 4


def _drafter(target: TargetModel, *, draft_vocab: int, seed: int) -> Eagle3Drafter:
    """A random drafter with weights large enough that attention patterns matter."""
    cfg = Eagle3Config.for_target(
        target.config, feature_layers=target.feature_layers, draft_vocab_size=draft_vocab
    )
    drafter = random_drafter(cfg, seed=seed, std=0.2)
    ids = torch.randperm(target.vocab_size, generator=torch.Generator().manual_seed(seed))
    drafter.set_draft_vocab(ids[:draft_vocab])  # a scattered draft vocab exercises d2t
    drafter.attach_embedding(target.embed_tokens)
    return drafter


def _id_maker(target: TargetModel, seed: int) -> Any:
    """``ids(n)``: n random token ids, a fresh seeded stream per call of this function."""
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> tuple[int, ...]:
        return tuple(int(t) for t in torch.randint(0, target.vocab_size, (n,), generator=g))

    return ids


def _batch(target: TargetModel) -> Any:
    """Three right-padded rows of different lengths, the shortest shorter than the unroll."""
    ids = _id_maker(target, 1)
    samples = [
        Sample(prompt_id="a", prompt_ids=ids(4), response_ids=ids(9)),
        Sample(prompt_id="b", prompt_ids=ids(3), response_ids=ids(3)),
        Sample(prompt_id="c", prompt_ids=ids(2), response_ids=ids(5)),
    ]
    batch = collate(samples, pad_id=0)
    assert int(batch.attention_mask.sum()) < batch.attention_mask.numel()  # padding present
    features, logits = target_features(target, batch.input_ids, batch.attention_mask)
    return batch, features, logits


def _grads(drafter: Eagle3Drafter, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    drafter.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in drafter.named_parameters() if p.grad is not None}


def test_step_attention_mask_is_causal_then_diagonal() -> None:
    mask = step_attention_mask(3, 2, torch.device("cpu"))
    expected = torch.tensor(
        [
            [1, 0, 0, 1, 0, 0, 1, 0, 0],
            [1, 1, 0, 0, 1, 0, 0, 1, 0],
            [1, 1, 1, 0, 0, 1, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)


def test_batched_unroll_matches_naive_reference(tiny_target: TargetModel) -> None:
    drafter = _drafter(tiny_target, draft_vocab=200, seed=0)
    batch, features, target_logits = _batch(tiny_target)
    args = (batch.loss_mask, batch.attention_mask)

    fast = ttt_unroll(
        drafter, features, batch.input_ids, target_logits, *args, steps=STEPS, return_logits=True
    )
    slow_logits, defined = naive_ttt_logits(
        drafter, features, batch.input_ids, batch.attention_mask, steps=STEPS
    )
    slow = ttt_loss_from_logits(slow_logits, target_logits, *args, drafter.d2t)

    assert fast.logits is not None and fast.logits.shape == slow_logits.shape
    assert int(defined.sum()) == 12 + 11 + 10 + 9 + 5 + 4 + 3 + 2 + 6 + 5 + 4 + 3
    torch.testing.assert_close(fast.logits[defined], slow_logits[defined], atol=2e-5, rtol=2e-5)
    # every step except the first is supervised somewhere, and the drafter's steps differ
    assert bool((fast.step_count > 0).all())
    assert not torch.allclose(fast.logits[:, 0], fast.logits[:, 1])
    torch.testing.assert_close(fast.loss, slow.loss)
    torch.testing.assert_close(fast.step_loss, slow.step_loss)
    torch.testing.assert_close(fast.step_acc, slow.step_acc)

    fast_grads = _grads(drafter, fast.loss)
    slow_grads = _grads(drafter, slow.loss)
    assert set(fast_grads) == {n for n, _ in drafter.named_parameters()}
    for name, grad in fast_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, slow_grads[name], atol=2e-5, rtol=1e-4, msg=name)


def test_the_head_on_supervised_entries_only_gives_the_same_loss_and_gradients(
    tiny_target: TargetModel,
) -> None:
    """Training skips the LM head on prompt and padding entries; nothing it returns changes."""
    drafter = _drafter(tiny_target, draft_vocab=200, seed=2)
    batch, features, target_logits = _batch(tiny_target)
    args = (batch.loss_mask, batch.attention_mask)
    full = ttt_unroll(
        drafter, features, batch.input_ids, target_logits, *args, steps=STEPS, return_logits=True
    )
    lean = ttt_unroll(drafter, features, batch.input_ids, target_logits, *args, steps=STEPS)
    assert lean.logits is None
    torch.testing.assert_close(lean.loss, full.loss)
    torch.testing.assert_close(lean.step_loss, full.step_loss)
    assert torch.equal(lean.step_acc, full.step_acc)
    assert torch.equal(lean.step_count, full.step_count)
    full_grads, lean_grads = _grads(drafter, full.loss), _grads(drafter, lean.loss)
    for name, grad in lean_grads.items():
        torch.testing.assert_close(grad, full_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_later_steps_on_the_entries_that_need_them_give_the_same_loss_and_gradients(
    tiny_target: TargetModel,
) -> None:
    """After step 0 training runs only each row's entries whose chain reaches a response token.
    Long prompts of different lengths and a row without any response token make the windows
    cut something in every row; the loss, the counts and the gradients stay those of the
    full unroll."""
    drafter = _drafter(tiny_target, draft_vocab=200, seed=3)
    ids = _id_maker(tiny_target, 4)
    samples = [
        Sample(prompt_id="a", prompt_ids=ids(14), response_ids=ids(6)),
        Sample(prompt_id="b", prompt_ids=ids(9), response_ids=ids(4)),
        Sample(prompt_id="c", prompt_ids=ids(11), response_ids=ids(9)),
        Sample(prompt_id="d", prompt_ids=ids(7), response_ids=()),
    ]
    batch = collate(samples, pad_id=0)
    features, target_logits = target_features(tiny_target, batch.input_ids, batch.attention_mask)
    args = (batch.loss_mask, batch.attention_mask)
    full = ttt_unroll(
        drafter, features, batch.input_ids, target_logits, *args, steps=STEPS, return_logits=True
    )
    lean = ttt_unroll(drafter, features, batch.input_ids, target_logits, *args, steps=STEPS)
    assert bool((full.step_count > 0).all())
    torch.testing.assert_close(lean.loss, full.loss)
    torch.testing.assert_close(lean.step_loss, full.step_loss)
    assert torch.equal(lean.step_acc, full.step_acc)
    assert torch.equal(lean.step_count, full.step_count)
    full_grads, lean_grads = _grads(drafter, full.loss), _grads(drafter, lean.loss)
    assert set(lean_grads) == set(full_grads)
    for name, grad in lean_grads.items():
        torch.testing.assert_close(grad, full_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_loss_counts_only_response_tokens_inside_the_sequence(tiny_target: TargetModel) -> None:
    drafter = _drafter(tiny_target, draft_vocab=200, seed=1)
    batch, features, target_logits = _batch(tiny_target)
    out = ttt_unroll(
        drafter,
        features,
        batch.input_ids,
        target_logits,
        batch.loss_mask,
        batch.attention_mask,
        steps=STEPS,
    )
    # entry i at step j predicts token i+2+j: a response token of its own row
    responses = [9, 3, 5]
    prompts = [4, 3, 2]
    expected = [
        sum(min(r, p + r - (2 + j)) for p, r in zip(prompts, responses, strict=True))
        for j in range(STEPS)
    ]
    assert out.step_count.tolist() == expected
    weights = 0.8 ** torch.arange(STEPS, dtype=torch.float32)
    torch.testing.assert_close(out.loss.detach(), (weights * out.step_loss).sum())


def test_drafter_equal_to_target_restricted_has_zero_excess_loss(tiny_target: TargetModel) -> None:
    """Soft CE is minimised (= entropy of p) and acc = 1 when the drafter's logits equal p's."""
    drafter = _drafter(tiny_target, draft_vocab=200, seed=2)
    batch, _, target_logits = _batch(tiny_target)
    n = batch.input_ids.shape[1] - 1
    restricted = target_logits.index_select(-1, drafter.d2t)  # [b, T, Vd]
    oracle = torch.stack(
        [
            torch.cat([restricted[:, 1 + j :], torch.zeros_like(restricted[:, : 1 + j])], 1)[:, :n]
            for j in range(STEPS)
        ],
        dim=1,
    )  # [b, S, N, Vd]: step j entry i gets the target logits at position i+1+j
    out = ttt_loss_from_logits(
        oracle.clone(), target_logits, batch.loss_mask, batch.attention_mask, drafter.d2t
    )
    assert out.step_acc.tolist() == pytest.approx([1.0] * STEPS)
    p = torch.softmax(restricted, dim=-1)
    entropy = -(p * torch.log(p)).sum(-1)  # [b, T]
    supervised = batch.loss_mask & batch.attention_mask.bool()
    first = entropy[:, 1:-1][supervised[:, 2:]].mean()  # step 0 predicts tokens 2..T-1
    torch.testing.assert_close(out.step_loss[0], first)


def test_left_padding_is_refused(tiny_target: TargetModel) -> None:
    drafter = _drafter(tiny_target, draft_vocab=50, seed=0)
    ids = torch.zeros(1, 4, dtype=torch.long)
    mask = torch.tensor([[0, 1, 1, 1]])
    features = torch.zeros(1, 4, 3 * tiny_target.hidden_size)
    with pytest.raises(ValueError, match="right-padded"):
        ttt_unroll(drafter, features, ids, torch.zeros(1, 4, tiny_target.vocab_size), mask, mask)
