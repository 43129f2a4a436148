"""Verification of a drafted block: pure functions of tensors (plus an optional generator).

Greedy: accept the longest prefix with d_j == argmax p_j; the bonus is argmax p_{m+1}.
Sampling (Leviathan et al. 2023; Chen et al. 2023): accept d_j with probability
min(1, p_j(d_j) / q_j(d_j)); at the first rejection resample from norm(max(0, p_j - q_j)); if all k
drafts are accepted the bonus is drawn from p_{k+1}. With argmax drafting q_j is one-hot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Verdict:
    accepted: int  # m, the number of drafts accepted
    bonus: int  # the token committed after them (correction or bonus)


def verify_greedy(draft: torch.Tensor, target_logits: torch.Tensor) -> Verdict:
    """draft: [k] target ids; target_logits: [k + 1, vocab] at [last committed, d_1..d_k]."""
    k = draft.shape[0]
    assert target_logits.shape[0] == k + 1
    choice = target_logits.argmax(dim=-1)  # [k + 1]
    matches = (choice[:k] == draft.to(choice.device)).to(torch.int64)
    accepted = int(matches.cumprod(dim=0).sum().item()) if k else 0
    return Verdict(accepted=accepted, bonus=int(choice[accepted].item()))


def one_hot_q(draft: torch.Tensor, vocab: int) -> torch.Tensor:
    """q for deterministic (argmax or n-gram) drafting: [k] -> [k, vocab]."""
    return torch.nn.functional.one_hot(draft, vocab).to(torch.float32)


def verify_sampling(
    draft: torch.Tensor,  # [k] target ids
    p: torch.Tensor,  # [k + 1, vocab] target probabilities after temperature/top-k/top-p
    q: torch.Tensor | None,  # [k, vocab] draft probabilities the drafts were sampled from
    generator: torch.Generator | None = None,
) -> Verdict:
    k = draft.shape[0]
    assert p.shape[0] == k + 1
    draft = draft.to(p.device)
    if q is None:
        q = one_hot_q(draft, p.shape[-1]).to(p.device)
    rows = torch.arange(k, device=p.device)
    p_d, q_d = p[rows, draft], q[rows, draft]  # [k]
    u = torch.rand(k, generator=generator, device=generator.device if generator else p.device)
    accept = (u.to(p.device) * q_d <= p_d) & (q_d > 0)  # u < p/q without dividing by q
    accepted = int(accept.to(torch.int64).cumprod(dim=0).sum().item()) if k else 0
    if accepted < k:
        residual = torch.clamp(p[accepted] - q[accepted], min=0.0)  # norm(max(0, p - q))
        total = residual.sum()
        dist = residual / total if total > 0 else p[accepted]
    else:
        dist = p[k]
    bonus = int(torch.multinomial(dist, 1, generator=generator).item())
    return Verdict(accepted=accepted, bonus=bonus)
