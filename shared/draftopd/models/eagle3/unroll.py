"""Batched drafting from many anchors at once: the EAGLE-3 side of ``Drafter.draft_from_anchors``.

Drafter entry i pairs the target feature at position i with token i+1 and sits at position i, as
in ``Eagle3Proposer``. Drafting from anchor position A reads entries 0..A-1 (built from the
target's features); the output of entry A-1 gives slot 1. Slot k >= 2 comes from a chain entry
that reads (hidden of slot k-1, token fed after slot k-1) at position A+k-2 and attends to entries
0..A-1 and to its own earlier chain entries.

One causal pass covers every real entry of every sequence (keys K_0); then K-1 chain steps run
over all anchors at once. Chain step s appends keys K_s (one per anchor) to the same cache and
queries it with the mask [entry < A | I | ... | I], the per-anchor analogue of TTT's step mask.
"""

from __future__ import annotations

import torch

from draftopd.models.eagle3.model import DrafterCache, Eagle3Drafter


def _gather_entries(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: [b, N, D], index: [b, C] -> [b, C, D]."""
    return x.gather(1, index[:, :, None].expand(-1, -1, x.shape[-1]))


def unroll_from_anchors(
    drafter: Eagle3Drafter,
    features: torch.Tensor,  # [b, T, 3H] target features of input_ids
    input_ids: torch.Tensor,  # [b, T]
    anchors: torch.Tensor,  # [b, C] absolute anchor positions, 1 <= A <= T-1
    num_slots: int,
    chain_inputs: torch.Tensor | None = None,  # [b, C, K] tokens fed at slots 2..K
) -> torch.Tensor:
    """Drafter logits at slots 1..K of a draft from every anchor: [b, C, K, Vd].

    ``chain_inputs[:, :, k-1]`` is the token fed after slot k (the recorded proposals, for the
    replay). ``None`` drafts freely: the input after slot k is the drafter's own argmax there, as
    ``Eagle3Proposer`` does in greedy decoding."""
    b, length = input_ids.shape
    n = length - 1  # entries 0..T-2
    device = input_ids.device
    if features.shape[:2] != (b, length):
        raise ValueError(f"features {tuple(features.shape)} do not match ids {(b, length)}")
    if bool((anchors > n).any()):
        raise ValueError("an anchor lies past the last drafter entry")
    if features.is_inference():
        features = features.clone()
    cache = DrafterCache()
    positions = torch.arange(n, device=device).expand(b, n)
    out = drafter(drafter.project(features[:, :n]), input_ids[:, 1:], positions, cache=cache)
    entry = anchors - 1  # [b, C]: the entry whose output is slot 1
    logits = [_gather_entries(out.logits, entry)]  # slot 1: [b, C, Vd]
    hidden = _gather_entries(out.hidden, entry)  # [b, C, H]
    cycles = entry.shape[1]
    context = torch.arange(n, device=device)[None, None, :] < anchors[:, :, None]  # [b, C, N]
    own = torch.eye(cycles, dtype=torch.bool, device=device).expand(b, cycles, cycles)
    for s in range(1, num_slots):
        if chain_inputs is None:
            tokens = drafter.d2t[logits[-1].argmax(-1)]  # [b, C] the drafter's own slot-s draft
        else:
            tokens = chain_inputs[:, :, s - 1]
        mask = torch.cat([context] + [own] * s, dim=-1)[:, None]  # [b, 1, C, N + s*C]
        out = drafter(hidden, tokens, entry + s, cache=cache, attn_mask=mask)
        logits.append(out.logits)
        hidden = out.hidden
    return torch.stack(logits, dim=2)


__all__ = ["unroll_from_anchors"]
