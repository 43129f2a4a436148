"""The ``Proposer`` protocol the decode loop sees, and the training-free n-gram proposer.

Drafter families bring their own proposer (``Drafter.proposer()``, e.g.
``models/eagle3/proposer.py``).

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

from draftopd.speculative.sampling import SamplingParams


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
