"""Draft proposers. The decode loop sees them only through the ``Proposer`` protocol.

Life of a proposer inside one request:
- ``start(prompt_ids, features)``: features of prompt[:-1] (the target's KV covers those);
- ``propose(context, k, ...)``: up to k draft tokens continuing ``context``;
- ``commit(committed, features)``: the cycle's committed tokens (accepted drafts + bonus) and the
  target features at [last committed, accepted drafts], i.e. the positions the target now caches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from draftopd.models.eagle3 import DrafterCache, Eagle3Drafter
from draftopd.speculative.sampling import SamplingParams, probs_from_logits


@dataclass(frozen=True)
class Proposal:
    tokens: list[int]  # the drafts d_1..d_k (target ids); may be shorter than asked
    q: torch.Tensor | None  # [k, vocab] distributions they were sampled from; None = deterministic


class Proposer(Protocol):
    needs_features: bool

    def start(self, prompt_ids: list[int], features: torch.Tensor | None) -> None: ...

    def propose(
        self, context: list[int], k: int, params: SamplingParams, generator: torch.Generator | None
    ) -> Proposal: ...

    def commit(self, committed: list[int], features: torch.Tensor | None) -> None: ...


class NgramProposer:
    """Prompt lookup (training-free): find the latest earlier occurrence of the context's last n
    tokens (n from ``max_ngram`` down to ``min_ngram``) and propose what followed it."""

    needs_features = False

    def __init__(self, *, max_ngram: int = 4, min_ngram: int = 2) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def start(self, prompt_ids: list[int], features: torch.Tensor | None) -> None:
        return None

    def commit(self, committed: list[int], features: torch.Tensor | None) -> None:
        return None

    def propose(
        self, context: list[int], k: int, params: SamplingParams, generator: torch.Generator | None
    ) -> Proposal:
        return Proposal(tokens=self.lookup(context, k), q=None)

    def lookup(self, context: list[int], k: int) -> list[int]:
        length = len(context)
        for n in range(min(self.max_ngram, length - 1), self.min_ngram - 1, -1):
            tail = context[length - n :]
            # the latest match wins: it is the most relevant to the current text
            for start in range(length - n - 1, -1, -1):
                if context[start : start + n] == tail:
                    follow = context[start + n : start + n + k]
                    if follow:
                        return follow
        return []


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
