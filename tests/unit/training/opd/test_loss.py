"""Draft-OPD losses (docs/draft_opd.md correctness check 5): gradient identities, floors, clipping
and
the global normalisation L = (lA*sum_A l + lB*sum_B w*l) / (lA*|A| + lB*sum_B w)."""

from __future__ import annotations

import math

import pytest
import torch

from draftopd.training.opd.loss import OPDLossConfig, bernoulli_fkl, forward_kl, k3, opd_loss


def test_stream_a_gradient_is_zero_when_q_equals_p() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 11, requires_grad=True)
    p = torch.softmax(logits.detach(), dim=-1)
    loss = forward_kl(logits, p).sum()
    loss.backward()
    assert logits.grad is not None
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-5)
    torch.testing.assert_close(logits.grad, torch.zeros_like(logits.grad), atol=1e-6, rtol=0)


def test_stream_a_gradient_is_q_minus_p_otherwise() -> None:
    """d KL(p||q) / d logits = q - p: the soft-CE gradient (it pulls q toward p)."""
    torch.manual_seed(1)
    logits = torch.randn(5, 7, requires_grad=True)
    p = torch.softmax(torch.randn(5, 7), dim=-1)
    forward_kl(logits, p).sum().backward()
    assert logits.grad is not None
    torch.testing.assert_close(logits.grad, torch.softmax(logits.detach(), -1) - p)


@pytest.mark.parametrize(("pt", "qs"), [(0.3, 0.6), (0.05, 0.5), (0.7, 0.2), (0.4, 0.4)])
def test_k3_gradient_is_one_minus_pt_over_qs(pt: float, qs: float) -> None:
    ls = torch.tensor(math.log(qs), requires_grad=True)
    value = k3(torch.tensor(math.log(pt)), ls, floor=-10.0)
    value.backward()
    assert ls.grad is not None
    assert float(ls.grad) == pytest.approx(1 - pt / qs, rel=1e-5)
    assert float(value.detach()) >= 0  # k3 is a non-negative estimator
    assert float(value.detach()) == pytest.approx(pt / qs - math.log(pt / qs) - 1, rel=1e-5)


def test_k3_pushes_probability_down_where_the_target_disagrees() -> None:
    """With pt < qs, gradient descent on ls lowers the drafter's log-prob of the token."""
    ls = torch.tensor(math.log(0.5), requires_grad=True)
    k3(torch.tensor(math.log(0.01)), ls, floor=-10.0).backward()
    assert ls.grad is not None and float(ls.grad) > 0.9


@pytest.mark.parametrize(("pt", "qs"), [(0.3, 0.6), (0.8, 0.1)])
def test_bernoulli_fkl_value_and_zero_gradient_at_equality(pt: float, qs: float) -> None:
    lt, ls = torch.tensor(math.log(pt)), torch.tensor(math.log(qs))
    expected = pt * math.log(pt / qs) + (1 - pt) * math.log((1 - pt) / (1 - qs))
    assert float(bernoulli_fkl(lt, ls, -10.0)) == pytest.approx(expected, rel=1e-5)
    same = torch.tensor(math.log(pt), requires_grad=True)
    value = bernoulli_fkl(lt, same, -10.0)
    value.backward()
    assert same.grad is not None
    assert float(value.detach()) == pytest.approx(0, abs=1e-6) and float(
        same.grad
    ) == pytest.approx(0, abs=1e-5)


def test_logprob_floor_stops_the_gradient_below_it() -> None:
    ls = torch.tensor(-30.0, requires_grad=True)  # q(d) = e^-30, floored to e^-10
    value = k3(torch.tensor(-1.0), ls, floor=-10.0)
    value.backward()
    assert float(value.detach()) == pytest.approx(math.exp(9) - 9 - 1, rel=1e-5)
    assert ls.grad is not None and float(ls.grad) == 0.0


def _inputs(
    b: int = 2, c: int = 3, k: int = 4, v: int = 9, seed: int = 0
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    stream_a = torch.rand(b, c, k, generator=g) < 0.5
    return {
        "logits": torch.randn(b, c, k, v, generator=g, requires_grad=True),
        "target_p": torch.softmax(torch.randn(b, c, k, v, generator=g), -1),
        "labels_a": torch.randint(0, v, (b, c, k), generator=g),
        "stream_a": stream_a,
        "labels_b": torch.randint(0, v, (b, c, k), generator=g),
        "teacher_logprobs": -torch.rand(b, c, k, generator=g) * 5,
        "stream_b": ~stream_a,
    }


def test_aggregation_is_the_globally_normalised_weighted_sum() -> None:
    x = _inputs()
    cfg = OPDLossConfig(lambda_a=0.7, lambda_b=1.3, gamma=0.5)
    out = opd_loss(**x, cfg=cfg)  # type: ignore[arg-type]
    per_a = forward_kl(x["logits"], x["target_p"])
    logq = torch.log_softmax(x["logits"], -1).gather(-1, x["labels_b"][..., None])[..., 0]
    per_b = k3(x["teacher_logprobs"], logq, -10.0).clamp(max=10.0)  # some tokens hit the clip
    assert bool((per_b == 10.0).any()) and bool((per_b < 10.0).any())
    w = (0.5 ** torch.arange(4.0)).expand_as(per_b) * x["stream_b"]
    numerator = 0.7 * per_a[x["stream_a"]].sum() + 1.3 * (w * per_b)[x["stream_b"]].sum()
    expected = numerator / (0.7 * x["stream_a"].sum() + 1.3 * w.sum())
    assert float(out.loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert out.count_a == int(x["stream_a"].sum()) and out.count_b == int(x["stream_b"].sum())


def test_lambda_b_zero_is_stream_a_alone_and_labels_outside_the_vocab_are_skipped() -> None:
    x = _inputs(seed=3)
    only_a = opd_loss(**x, cfg=OPDLossConfig(lambda_b=0.0))  # type: ignore[arg-type]
    per_a = forward_kl(x["logits"], x["target_p"])
    assert float(only_a.loss.detach()) == pytest.approx(
        float(per_a[x["stream_a"]].mean().detach()), rel=1e-5
    )
    x["labels_b"] = torch.full_like(x["labels_b"], -1)  # proposals the draft vocab cannot hold
    assert opd_loss(**x, cfg=OPDLossConfig()).count_b == 0  # type: ignore[arg-type]


def test_each_token_loss_is_clipped() -> None:
    x = _inputs(seed=4)
    x["stream_a"] = torch.zeros_like(x["stream_a"])
    x["teacher_logprobs"] = torch.zeros_like(x["teacher_logprobs"])  # pt = 1
    with torch.no_grad():
        x["logits"][..., :] = 0
        x["logits"][..., 0] = 50.0  # q(label) ~ e^-50, floored at e^-10 -> k3 = e^10 - 11
    x["labels_b"] = torch.ones_like(x["labels_b"])
    out = opd_loss(**x, cfg=OPDLossConfig(clip=10.0))  # type: ignore[arg-type]
    assert float(out.loss.detach()) == pytest.approx(10.0)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="stream_a_loss"):
        OPDLossConfig(stream_a_loss="mse")
    with pytest.raises(ValueError, match="not both 0"):
        OPDLossConfig(lambda_a=0.0, lambda_b=0.0)
    with pytest.raises(ValueError, match="gamma"):
        OPDLossConfig(gamma=0.0)
