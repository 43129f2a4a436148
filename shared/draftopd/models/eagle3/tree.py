"""EAGLE-3 drafting as a dynamic tree (EAGLE-2, Li et al. 2024), on the lean drafter step.

A chain drafter bets each cycle on one continuation: on MT-Bench our CPU-trained drafter's first
draft is the target's token about a third of the time, while the target's token is often among
its next few candidates. A tree keeps several: the drafter's KV cache holds the committed prefix;
each depth runs ONE drafter forward over the ``branch`` best nodes of that depth (ranked by
cumulative draft log-probability), each node attending to the prefix and its own ancestors at the
position of its depth, so every root-to-leaf path is drafted exactly as a chain would draft it.
The ``nodes`` best nodes overall go to the target, which scores them in one forward
(``speculative/tree.py``). A child's score never exceeds its parent's, and a parent is numbered
before its children, so the best nodes always form a tree rooted at the last committed token.

With ``min_prob`` (``DraftTree``), nodes whose path probability under the drafter is below it are
never added, and drafting stops at the first depth with none left: where the drafter is unsure
the cycle verifies fewer tokens, which is what a token of verification costing ~4% of a target
step on a CPU asks for (docs/engine.md).

Children are the top tokens of the drafter's distribution, chosen without a draw: verification
treats them as deterministic candidates, which keeps greedy output and the sampling distribution
exactly the target's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from draftopd.models.eagle3.model import Eagle3Drafter
from draftopd.models.eagle3.proposer import Eagle3Proposer
from draftopd.models.lean_llama import StaticKVCache
from draftopd.speculative.proposers import Proposal
from draftopd.speculative.sampling import SamplingParams
from draftopd.speculative.tree import DraftTree


@dataclass
class _Nodes:
    """The drafted tree while it grows: node i's token, parent (-1 = root), score, depth."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)
    slots: dict[int, int] = field(default_factory=dict)  # expanded node -> drafter cache slot
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # expanded node -> [H]

    def add(
        self, parent: int, depth: int, tokens: list[int], logps: list[float], *, floor: float
    ) -> None:
        """Children of ``parent`` (-1 = root) whose cumulative log-probability is >= floor."""
        base = self.scores[parent] if parent >= 0 else 0.0
        for token, logp in zip(tokens, logps, strict=True):
            if base + logp < floor and (parent >= 0 or self.tokens):
                continue  # below the tree's min_prob (the best first-depth node always stays)
            self.tokens.append(token)
            self.parents.append(parent)
            self.scores.append(base + logp)
            self.depths.append(depth)

    def best(self, count: int, *, depth: int | None = None) -> list[int]:
        """The ``count`` best nodes (of one depth), best first; ties go to the older node."""
        pool = range(len(self.tokens))
        if depth is not None:
            pool = [i for i in pool if self.depths[i] == depth]  # type: ignore[assignment]
        return sorted(pool, key=lambda i: (-self.scores[i], i))[:count]

    def ancestors(self, node: int) -> list[int]:
        found = []
        parent = self.parents[node]
        while parent >= 0:
            found.append(parent)
            parent = self.parents[parent]
        return found


class Eagle3TreeProposer(Eagle3Proposer):
    """``Eagle3Proposer`` with tree drafts: k is the tree's depth (module docstring)."""

    def __init__(self, drafter: Eagle3Drafter, *, tree: DraftTree, weights: str = "auto") -> None:
        super().__init__(drafter, argmax_drafting=True, weights=weights)
        if self.lean is None:
            raise ValueError(
                "tree drafting runs on the lean drafter step: a float32 drafter on a CPU with the "
                "native kernel, draft weights 'auto', 'float32', 'bfloat16' or 'int8'"
            )
        self.tree = tree

    @torch.inference_mode()
    def propose(
        self, context: list[int], k: int, params: SamplingParams, generator: torch.Generator | None
    ) -> Proposal:
        root = self._feed_pending() if k > 0 else None
        if root is None:
            return Proposal(tokens=[], q=None)
        real_length = self.cache.length
        nodes = _Nodes()
        self._expand(nodes, [-1], root.logits[None], depth=1)
        root_hidden = root.hidden[-1]
        floor = self._floor()
        for depth in range(1, k):
            frontier = nodes.best(self.tree.branch, depth=depth)
            frontier = [i for i in frontier if nodes.scores[i] >= floor]
            if not frontier:
                break  # every candidate of this depth is below min_prob: nothing to expand
            hidden = torch.stack(
                [nodes.hidden[p] if p >= 0 else root_hidden for p in
                 (nodes.parents[i] for i in frontier)]
            )  # fmt: skip
            logits = self._level(nodes, frontier, hidden, real_length, depth)
            self._expand(nodes, frontier, logits, depth=depth + 1)
        self.cache.crop(real_length)
        keep = sorted(nodes.best(self.tree.nodes))  # topological: parents are numbered first
        index = {node: new for new, node in enumerate(keep)}
        parents = tuple(-1 if nodes.parents[i] < 0 else index[nodes.parents[i]] for i in keep)
        return Proposal(tokens=[nodes.tokens[i] for i in keep], q=None, parents=parents)

    def _expand(
        self, nodes: _Nodes, parents: list[int], logits: torch.Tensor, *, depth: int
    ) -> None:
        """Add the ``branch`` most likely tokens under each parent (logits [n, Vd])."""
        logp = torch.log_softmax(logits.float(), dim=-1)
        top = torch.topk(logp, min(self.tree.branch, logp.shape[-1]), dim=-1)  # [n, branch]
        tokens = self.drafter.d2t[top.indices].tolist()
        for row, parent in enumerate(parents):
            nodes.add(parent, depth, tokens[row], top.values[row].tolist(), floor=self._floor())

    def _floor(self) -> float:
        """min_prob as a cumulative log-probability (-inf without one)."""
        return math.log(self.tree.min_prob) if self.tree.min_prob > 0 else -math.inf

    def _level(
        self,
        nodes: _Nodes,
        frontier: list[int],
        hidden: torch.Tensor,  # [n, H]: each frontier node's parent's output
        real_length: int,
        depth: int,
    ) -> torch.Tensor:
        """One drafter forward over the frontier (nodes of ``depth``) -> their logits [n, Vd]."""
        assert self.lean is not None and isinstance(self.cache, StaticKVCache)
        first = self.cache.length
        sees = torch.zeros((len(frontier), first + len(frontier)), dtype=torch.bool)
        sees[:, :real_length] = True
        for row, node in enumerate(frontier):
            sees[row, [nodes.slots[a] for a in nodes.ancestors(node)]] = True
            sees[row, first + row] = True
        positions = torch.full((len(frontier),), real_length + depth - 1, dtype=torch.long)
        ids = torch.tensor([nodes.tokens[i] for i in frontier])
        logits, out = self.lean.forward_rows(
            hidden, ids, self.cache, positions=positions, sees=sees
        )
        for row, node in enumerate(frontier):
            nodes.slots[node] = first + row
            nodes.hidden[node] = out[row]
        return logits


__all__ = ["Eagle3TreeProposer"]
