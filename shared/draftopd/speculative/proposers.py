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
    lookup: bool = False  # drafted by LookupFirstProposer's n-gram lookup in the drafter's place
    # a draft tree (speculative/tree.py): the parent of each draft, -1 = the last committed token;
    # drafts are in topological order and a node's children are distinct, deterministic tokens
    # (q is None). None: a chain d_1..d_k.
    parents: tuple[int, ...] | None = None


def check_stop_below(stop_below: float) -> float:
    """A drafter proposer's confidence floor (``Drafter.proposer``): 0 (off) up to 1."""
    if not 0.0 <= stop_below <= 1.0:
        raise ValueError(f"stop_below must be in [0, 1], got {stop_below}")
    return stop_below


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


class LookupFirstProposer:
    """n-gram lookup first, a trained drafter otherwise (``--lookup-first N``, docs/engine.md).

    Where the context repeats itself (lists, code, quoted prompt text) prompt lookup proposes up
    to ``lookup_tokens`` tokens at no drafting cost, and those runs are accepted far more often
    than the drafter's; elsewhere the drafter proposes up to ``drafter_tokens``. Each cycle uses
    one of the two, decided from the committed context alone, so greedy output stays the
    target's and sampling stays exact (n-gram drafts are one-hot, the drafter brings its q).

    The drafter sees every commit, also on lookup cycles: its ``commit`` must accumulate the
    features of cycles it did not draft (``Eagle3Proposer`` and ``DFlashProposer`` do).
    """

    def __init__(
        self,
        drafter: Proposer,
        *,
        lookup_tokens: int,
        drafter_tokens: int,
        lookup: NgramProposer | None = None,
    ) -> None:
        if lookup_tokens < 1 or drafter_tokens < 1:
            raise ValueError(
                f"need lookup_tokens >= 1 and drafter_tokens >= 1, got {lookup_tokens}, "
                f"{drafter_tokens}"
            )
        self.drafter = drafter
        self.lookup = lookup or NgramProposer()
        self.lookup_tokens, self.drafter_tokens = lookup_tokens, drafter_tokens
        self.needs_features = drafter.needs_features
        self.lookup_cycles = 0  # cycles the lookup proposed (the rest went to the drafter)
        self.drafter_cycles = 0

    @property
    def num_draft_tokens(self) -> int:
        """The K the decode loop must allow: the longer of the two."""
        return max(self.lookup_tokens, self.drafter_tokens)

    def start(self, prompt_ids: list[int], features: torch.Tensor | None) -> None:
        self.drafter.start(prompt_ids, features)

    def commit(self, committed: list[int], features: torch.Tensor | None) -> None:
        self.drafter.commit(committed, features)

    def propose(
        self, context: list[int], k: int, params: SamplingParams, generator: torch.Generator | None
    ) -> Proposal:
        tokens = self.lookup.lookup(context, min(k, self.lookup_tokens))
        if tokens:
            self.lookup_cycles += 1
            return Proposal(tokens=tokens, q=None, lookup=True)
        self.drafter_cycles += 1
        return self.drafter.propose(context, min(k, self.drafter_tokens), params, generator)
