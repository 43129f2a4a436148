"""Drafting with an EAGLE-3 drafter: autoregressive, with the drafter's own KV cache.

Two forwards compute the same drafter: the module's (any device and dtype) and the lean one
(``models/eagle3/lean.py``: CPU, native kernel, float32, bfloat16 or int8 weights). ``weights``
picks: "module", "float32", "bfloat16", "int8", or "auto" (bfloat16 where the native kernel
runs, else module). Serving takes "auto"; whatever records rollouts or measures tau for
training asks for "float32", so that its drafts are the float32 training drafter's
(docs/engine.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from draftopd.models.eagle3.model import DrafterCache, Eagle3Drafter
from draftopd.models.lean_llama import StaticKVCache
from draftopd.speculative.proposers import Proposal, check_stop_below
from draftopd.speculative.sampling import SamplingParams, probs_from_logits


class Eagle3Proposer:
    """Autoregressive drafting with an EAGLE-3 drafter and its own KV cache.

    Drafter entry i pairs the target feature at position i with token i+1. The entries with real
    target features stay cached across cycles; the entries made while drafting are cropped away.
    """

    needs_features = True

    def __init__(
        self,
        drafter: Eagle3Drafter,
        *,
        argmax_drafting: bool = False,
        weights: str = "auto",
        stop_below: float = 0.0,
    ) -> None:
        self.drafter = drafter
        self.argmax_drafting = argmax_drafting
        self.stop_below = check_stop_below(stop_below)
        self.lean = drafter.lean_step(weights)
        self.cache = self._new_cache()
        self.pending_features: torch.Tensor | None = None  # [n, 3H] not yet in the cache
        self.pending_tokens: list[int] = []

    def _new_cache(self) -> DrafterCache | StaticKVCache:
        return self.lean.new_cache() if self.lean is not None else DrafterCache()

    def _forward(self, hidden: torch.Tensor, ids: list[int], start: int) -> _Step:
        """hidden [n, H] paired with ``ids`` at positions start.. -> last logits, hidden [n, H]."""
        device = self.drafter.fc.weight.device
        if self.lean is not None:
            assert isinstance(self.cache, StaticKVCache)
            logits, out = self.lean.forward(hidden, torch.tensor(ids), self.cache)
            return _Step(logits, out)
        assert isinstance(self.cache, DrafterCache)
        positions = torch.arange(start, start + len(ids), device=device)[None]
        result = self.drafter(
            hidden[None], torch.tensor([ids], device=device), positions, cache=self.cache
        )
        return _Step(result.logits[0, -1], result.hidden[0])

    def _project(self, features: torch.Tensor) -> torch.Tensor:
        if self.lean is not None:
            return self.lean.project(features)
        return self.drafter.project(features.to(self.drafter.fc.weight.device)[None])[0]

    def start(self, prompt_ids: list[int], features: torch.Tensor | None) -> None:
        self.cache = self._new_cache()
        self.pending_features = features
        self.pending_tokens = list(prompt_ids[1:])

    def commit(self, committed: list[int], features: torch.Tensor | None) -> None:
        """Queue the cycle's entries. A cycle this proposer did not draft (k = 0 at the length
        cap, or a lookup cycle of ``LookupFirstProposer``) leaves its entries queued: they are
        contiguous with the next cycle's, so both enter the cache at the next ``propose``."""
        assert features is not None and features.shape[0] == len(committed)
        if self.pending_features is not None and self.pending_tokens:
            features = torch.cat([self.pending_features, features])
            committed = [*self.pending_tokens, *committed]
        self.pending_features = features
        self.pending_tokens = list(committed)

    def _feed_pending(self) -> _Step | None:
        """Put the queued entries (real target features) into the drafter's cache: the step
        that drafting continues from, or None when nothing is queued."""
        if self.pending_features is None or not self.pending_tokens:
            return None
        features, tokens = self.pending_features, self.pending_tokens
        self.pending_features, self.pending_tokens = None, []
        return self._forward(self._project(features), tokens, self.cache.length)

    def _doubtful(self, logits: torch.Tensor, params: SamplingParams) -> bool:
        """Whether the drafter's most likely token at this slot is below ``stop_below``. Read
        from the distribution before any draw: a stop that depended on the drawn token would
        skew the drafts that are proposed away from q, and sampling would no longer be exact."""
        if self.stop_below <= 0:
            return False
        if params.greedy or self.argmax_drafting:
            probs = torch.softmax(logits.float(), dim=-1)
        else:
            probs = probs_from_logits(logits, params)
        return float(probs.max().item()) < self.stop_below

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
        step = self._feed_pending() if k > 0 else None
        if step is None:
            return Proposal(tokens=[], q=None)
        real_length = self.cache.length
        tokens: list[int] = []
        qs: list[torch.Tensor | None] = []
        for index in range(k):
            if index > 0 and self._doubtful(step.logits, params):
                break  # the drafter doubts this slot: verify the drafts before it
            token, q = self._draft_token(step.logits, params, generator)
            tokens.append(token)
            qs.append(q)
            if index == k - 1:
                break
            step = self._forward(step.hidden[-1:], [token], real_length + index)
        self.cache.crop(real_length)
        if any(q is None for q in qs):
            return Proposal(tokens=tokens, q=None)
        return Proposal(tokens=tokens, q=torch.stack([q for q in qs if q is not None]))


@dataclass(frozen=True)
class _Step:
    logits: torch.Tensor  # [draft_vocab] at the last position
    hidden: torch.Tensor  # [n, H] pre-norm hidden states, fed back at the next step


__all__ = ["Eagle3Proposer"]
