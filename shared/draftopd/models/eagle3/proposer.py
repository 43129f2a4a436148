"""Drafting with an EAGLE-3 drafter: autoregressive, with the drafter's own KV cache."""

from __future__ import annotations

import torch

from draftopd.models.eagle3.model import DrafterCache, Eagle3Drafter
from draftopd.speculative.proposers import Proposal
from draftopd.speculative.sampling import SamplingParams, probs_from_logits


class Eagle3Proposer:
    """Autoregressive drafting with an EAGLE-3 drafter and its own KV cache.

    Drafter entry i pairs the target feature at position i with token i+1. The entries with real
    target features stay cached across cycles; the entries made while drafting are cropped away.
    """

    needs_features = True

    def __init__(self, drafter: Eagle3Drafter, *, argmax_drafting: bool = False) -> None:
        self.drafter = drafter
        self.argmax_drafting = argmax_drafting
        self.cache = DrafterCache()
        self.pending_features: torch.Tensor | None = None  # [n, 3H] not yet in the cache
        self.pending_tokens: list[int] = []

    def start(self, prompt_ids: list[int], features: torch.Tensor | None) -> None:
        self.cache = DrafterCache()
        self.pending_features = features
        self.pending_tokens = list(prompt_ids[1:])

    def commit(self, committed: list[int], features: torch.Tensor | None) -> None:
        assert features is not None and features.shape[0] == len(committed)
        self.pending_features = features
        self.pending_tokens = list(committed)

    def _draft_token(
        self, logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
    ) -> tuple[int, torch.Tensor | None]:
        """logits: [draft_vocab] -> (target id, q over the target vocab or None if one-hot)."""
        d2t = self.drafter.d2t
        if params.greedy or self.argmax_drafting:
            return int(d2t[int(logits.argmax().item())].item()), None
        q_draft = probs_from_logits(logits, params)  # [draft_vocab]
        index = int(torch.multinomial(q_draft, 1, generator=generator).item())
        q = torch.zeros(self.drafter.cfg.target_vocab_size, device=q_draft.device)
        q[d2t] = q_draft
        return int(d2t[index].item()), q

    @torch.inference_mode()
    def propose(
        self, context: list[int], k: int, params: SamplingParams, generator: torch.Generator | None
    ) -> Proposal:
        if k <= 0 or self.pending_features is None or not self.pending_tokens:
            return Proposal(tokens=[], q=None)
        device = self.drafter.fc.weight.device
        start = self.cache.length
        n = len(self.pending_tokens)
        hidden = self.drafter.project(self.pending_features.to(device)[None])  # [1, n, H]
        ids = torch.tensor([self.pending_tokens], device=device)
        positions = torch.arange(start, start + n, device=device)[None]
        out = self.drafter(hidden, ids, positions, cache=self.cache)
        real_length = self.cache.length
        self.pending_features, self.pending_tokens = None, []
        tokens: list[int] = []
        qs: list[torch.Tensor | None] = []
        logits, hidden = out.logits[0, -1], out.hidden[:, -1:]
        for step in range(k):
            token, q = self._draft_token(logits, params, generator)
            tokens.append(token)
            qs.append(q)
            if step == k - 1:
                break
            position = torch.tensor([[real_length + step]], device=device)
            out = self.drafter(
                hidden, torch.tensor([[token]], device=device), position, cache=self.cache
            )
            logits, hidden = out.logits[0, -1], out.hidden
        self.cache.crop(real_length)
        if any(q is None for q in qs):
            return Proposal(tokens=tokens, q=None)
        return Proposal(tokens=tokens, q=torch.stack([q for q in qs if q is not None]))


__all__ = ["Eagle3Proposer"]
