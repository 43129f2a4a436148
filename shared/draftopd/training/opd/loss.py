"""Draft-OPD losses over replayed slots (docs/draft_opd.md, "Replay and loss").

Stream A (slots 1..m+1, on the target's text), per slot:
- ``soft_ce``: forward KL(p || q) over the draft vocabulary, p the target distribution restricted to
  the draft vocabulary and renormalised. It is the soft cross-entropy minus the target's entropy:
  the same gradient, but 0 when q = p, so the per-token clip acts on the divergence.
- ``bernoulli_fkl``: the Bernoulli forward KL on the realised token y,
  pt*log(pt/qs) + (1-pt)*log((1-pt)/(1-qs)), with pt = p(y), qs = q(y).

Stream B (slots m+1..K, label = the rejected proposal d_k, teacher log-prob lt from verification),
weighted by gamma^(k-1):
- ``k3``: the k3 reverse-KL estimator exp(lt - ls) - (lt - ls) - 1 with ls = log q(d_k);
  d/d ls = 1 - pt/qs.
- ``bernoulli_fkl``: the forward-KL ablation on the same token, with pt = exp(lt).

Log-probs are floored at ``logprob_floor`` (-10) and each token's loss clipped to [-clip, clip].
Aggregation: L = (lA * sum_A l + lB * sum_B w*l) / (lA * |A| + lB * sum_B w).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from draftopd.training.configs import STREAM_A_LOSSES, STREAM_B_LOSSES, OPDLossConfig


def _floor(logprob: torch.Tensor, floor: float) -> torch.Tensor:
    return logprob.clamp(min=floor)


def forward_kl(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """KL(p || softmax(logits)) per row: [..., V], [..., V] -> [...]."""
    logq = torch.log_softmax(logits.float(), dim=-1)
    plogp = torch.where(p > 0, p * torch.log(p.clamp(min=1e-30)), torch.zeros_like(p))
    return (plogp - p * logq).sum(-1)


def bernoulli_fkl(logp_t: torch.Tensor, logq_s: torch.Tensor, floor: float) -> torch.Tensor:
    """pt*log(pt/qs) + (1-pt)*log((1-pt)/(1-qs)) from log-probs (floored)."""
    lt, ls = _floor(logp_t, floor), _floor(logq_s, floor)
    pt, qs = lt.exp(), ls.exp()
    # log(1 - x) = log1p(-exp(log x)), kept finite near x = 1
    l1t = torch.log1p(-pt.clamp(max=1 - 1e-6))
    l1s = torch.log1p(-qs.clamp(max=1 - 1e-6))
    return pt * (lt - ls) + (1 - pt) * (l1t - l1s)


def k3(logp_t: torch.Tensor, logq_s: torch.Tensor, floor: float) -> torch.Tensor:
    """exp(lt - ls) - (lt - ls) - 1 (floored log-probs)."""
    diff = _floor(logp_t, floor) - _floor(logq_s, floor)
    return diff.exp() - diff - 1


@dataclass(frozen=True)
class OPDLossOutput:
    loss: torch.Tensor  # [] differentiable
    stream_a: float  # mean per-token stream-A loss (detached)
    stream_b: float  # weighted mean per-token stream-B loss
    count_a: int
    count_b: int
    weight_b: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "loss": float(self.loss.detach()),
            "loss_a": self.stream_a,
            "loss_b": self.stream_b,
            "slots_a": self.count_a,
            "slots_b": self.count_b,
            "weight_b": self.weight_b,
        }


def opd_loss(
    logits: torch.Tensor,  # [b, C, K, Vd] replayed drafter logits
    target_p: torch.Tensor,  # [b, C, K, Vd] target distribution over the draft vocab per slot
    labels_a: torch.Tensor,  # [b, C, K] draft id of the target's token at each stream-A slot
    stream_a: torch.Tensor,  # [b, C, K] bool
    labels_b: torch.Tensor,  # [b, C, K] draft id of the rejected proposal (-1 = not drafted)
    teacher_logprobs: torch.Tensor,  # [b, C, K]
    stream_b: torch.Tensor,  # [b, C, K] bool
    cfg: OPDLossConfig,
) -> OPDLossOutput:
    clip, floor = cfg.clip, cfg.logprob_floor
    logq = torch.log_softmax(logits.float(), dim=-1)
    # stream A
    mask_a = stream_a & (labels_a >= 0)
    if cfg.stream_a_loss == "soft_ce":
        per_a = forward_kl(logits, target_p)
    else:
        index = labels_a.clamp(min=0)[..., None]
        logp_t = torch.log(target_p.gather(-1, index)[..., 0].clamp(min=1e-30))
        per_a = bernoulli_fkl(logp_t, logq.gather(-1, index)[..., 0], floor)
    per_a = per_a.clamp(-clip, clip)
    sum_a = torch.where(mask_a, per_a, torch.zeros_like(per_a)).sum()
    count_a = mask_a.sum()
    # stream B
    mask_b = stream_b & (labels_b >= 0)
    logq_b = logq.gather(-1, labels_b.clamp(min=0)[..., None])[..., 0]
    if cfg.stream_b_loss == "k3":
        per_b = k3(teacher_logprobs, logq_b, floor)
    else:
        per_b = bernoulli_fkl(teacher_logprobs, logq_b, floor)
    per_b = per_b.clamp(-clip, clip)
    slot = torch.arange(logits.shape[2], device=logits.device, dtype=torch.float32)
    weights = (cfg.gamma**slot).expand_as(per_b) * mask_b  # slot index k-1
    sum_b = (torch.where(mask_b, per_b, torch.zeros_like(per_b)) * weights).sum()
    weight_b = weights.sum()
    denominator = cfg.lambda_a * count_a + cfg.lambda_b * weight_b
    loss = (cfg.lambda_a * sum_a + cfg.lambda_b * sum_b) / denominator.clamp(min=1e-9)
    return OPDLossOutput(
        loss=loss,
        stream_a=float(sum_a.detach() / count_a.clamp(min=1)),
        stream_b=float(sum_b.detach() / weight_b.clamp(min=1e-9)),
        count_a=int(count_a),
        count_b=int(mask_b.sum()),
        weight_b=float(weight_b),
    )


__all__ = [
    "STREAM_A_LOSSES",
    "STREAM_B_LOSSES",
    "OPDLossConfig",
    "OPDLossOutput",
    "bernoulli_fkl",
    "forward_kl",
    "k3",
    "opd_loss",
]
