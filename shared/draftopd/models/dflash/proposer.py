"""Drafting with a DFlash block drafter: the whole block in one pass.

The context keys/values of every committed position before the anchor stay cached across
cycles: ``start`` caches the prompt's (all but its last token, which is the first anchor) and
``commit`` appends the positions the target has just verified (the old anchor and the accepted
drafts). ``propose`` then runs one pass over ``[anchor token, MASK x (B-1)]`` and reads slots
1..k. Greedy decoding (or ``argmax_drafting``) proposes each slot's argmax with a one-hot q;
sampling draws each slot from its own q, which is exactly the distribution the drafts come from
(the slots do not depend on each other's draws), so verification stays lossless.

With ``lean`` (``lean.py``, the native kernel) the context lives in a preallocated cache and the
block pass runs on packed weights; without, the module's pass and a ``ContextCache``.
"""

from __future__ import annotations

import torch

from draftopd.models.dflash.lean import LeanDFlash
from draftopd.models.dflash.model import ContextCache, DFlashModule
from draftopd.models.lean_llama import StaticKVCache
from draftopd.speculative.proposers import Proposal, check_stop_below
from draftopd.speculative.sampling import SamplingParams, probs_from_logits


class DFlashProposer:
    needs_features = True

    def __init__(
        self,
        drafter: DFlashModule,
        *,
        argmax_drafting: bool = False,
        lean: LeanDFlash | None = None,
        stop_below: float = 0.0,
    ) -> None:
        self.drafter = drafter
        self.argmax_drafting = argmax_drafting
        self.stop_below = check_stop_below(stop_below)
        self.lean = lean
        self.cache: ContextCache | None = None
        self.static: StaticKVCache | None = None  # the lean pass's context cache

    @property
    def max_drafts(self) -> int:
        return self.drafter.cfg.block_size - 1

    @property
    def context_length(self) -> int:
        if self.lean is not None:
            return self.static.length if self.static is not None else 0
        return self.cache.length if self.cache is not None else 0

    @torch.inference_mode()
    def _extend(self, features: torch.Tensor | None) -> None:
        if features is None or features.shape[0] == 0:
            return
        if self.lean is not None:
            if self.static is None:
                self.static = self.lean.new_cache()
            self.lean.extend(features, self.static)
            return
        device = self.drafter.fc.weight.device
        start = 0 if self.cache is None else self.cache.length
        piece = self.drafter.context(features.to(device)[None], start)
        if self.cache is None:
            self.cache = piece
            return
        self.cache = ContextCache(
            keys=[torch.cat([a, b], 2) for a, b in zip(self.cache.keys, piece.keys, strict=True)],
            values=[
                torch.cat([a, b], 2) for a, b in zip(self.cache.values, piece.values, strict=True)
            ],
        )

    def start(self, prompt_ids: list[int], features: torch.Tensor | None) -> None:
        self.cache = None
        if self.static is not None:
            self.static.length = 0
        self._extend(features)

    def commit(self, committed: list[int], features: torch.Tensor | None) -> None:
        assert features is not None and features.shape[0] == len(committed)
        self._extend(features)

    @torch.inference_mode()
    def propose(
        self, context: list[int], k: int, params: SamplingParams, generator: torch.Generator | None
    ) -> Proposal:
        k = min(k, self.max_drafts)
        if k <= 0 or self.context_length == 0:
            return Proposal(tokens=[], q=None)
        anchor = len(context) - 1
        assert self.context_length == anchor, (self.context_length, anchor)
        if self.lean is not None:
            assert self.static is not None
            logits = self.lean.propose(context[-1], k, self.static)  # [k, draft_vocab]
        else:
            assert self.cache is not None
            device = self.drafter.fc.weight.device
            logits = self.drafter.blocks(
                self.cache,
                torch.tensor([[context[-1]]], device=device),
                torch.tensor([[anchor]], device=device),
                all_context=True,
            )[0, 0, :k]  # [k, draft_vocab]
        d2t = self.drafter.d2t
        if params.greedy or self.argmax_drafting:
            keep = self._kept(torch.softmax(logits.float(), dim=-1)) if self.stop_below else k
            chosen = logits[:keep].argmax(-1)  # [keep]
            return Proposal(tokens=[int(t) for t in d2t[chosen].tolist()], q=None)
        q_draft = probs_from_logits(logits, params)  # [k, Vd]
        keep = self._kept(q_draft)
        drawn = torch.multinomial(q_draft[:keep], 1, generator=generator)[:, 0]  # [keep]
        q = torch.zeros(keep, self.drafter.cfg.target_vocab_size, device=q_draft.device)
        q[:, d2t] = q_draft[:keep]
        return Proposal(tokens=[int(t) for t in d2t[drawn].tolist()], q=q)

    def _kept(self, probs: torch.Tensor) -> int:
        """How many slots to propose: up to (not including) the first slot after the first whose
        most likely draft is below ``stop_below``. Read from the distributions, never from a
        draw (a stop that depended on the drawn token would make sampling inexact)."""
        k = int(probs.shape[0])
        if self.stop_below <= 0:
            return k
        low = (probs[1:].max(dim=-1).values < self.stop_below).nonzero()
        return k if low.numel() == 0 else 1 + int(low[0, 0].item())


__all__ = ["DFlashProposer"]
