"""Tree drafts: the layout of a drafted token tree and its verification (pure functions).

A tree proposal drafts several continuations at once (EAGLE-2/EAGLE-3's dynamic draft tree, Li et
al. 2024; SpecInfer, Miao et al. 2024). The target scores the whole tree in ONE forward: block
index 0 is the last committed token (the root), index i > 0 a drafted node; every node sees the
cached prefix, its ancestors and itself (``attention_mask``) at the position of its depth
(``positions``). Verification walks down from the root:

- greedy: the child whose token is the target's argmax at its parent, until there is none; the
  bonus is that argmax. The committed tokens are exactly greedy decoding's.
- sampling, with deterministic candidates (a node's children are distinct tokens chosen without
  any draw): try the children in order with the residual r = p of the parent: accept child c with
  probability r(c) / sum(r), else set r(c) = 0; when all are rejected draw the bonus from
  r / sum(r) (the multi-candidate rejection of SpecInfer for one-hot drafts). Each step outputs
  token x with probability p(x), so the output keeps the target's distribution.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from draftopd.wire.formats import parse_draft_tree


@dataclass(frozen=True)
class DraftTree:
    """The shape of a drafter's dynamic tree (EAGLE-2): at each depth up to K, the ``branch``
    best nodes of that depth (by cumulative draft log-probability) are expanded into their
    ``branch`` most likely next tokens; the ``nodes`` best nodes overall are verified. With
    ``min_prob``, a node whose path probability under the drafter is below it is never added
    (the best first-depth node always is), so unsure cycles verify fewer nodes and stop
    drafting early."""

    branch: int  # children per expanded node, and nodes expanded per depth
    nodes: int  # drafted tokens the target verifies per cycle, at most (the root not counted)
    min_prob: float = 0.0  # the floor on a node's cumulative draft probability (0 = none)

    def __post_init__(self) -> None:
        if self.branch < 1 or self.nodes < 1 or not 0.0 <= self.min_prob < 1.0:
            raise ValueError(
                f"a draft tree needs branch >= 1, nodes >= 1 and 0 <= min_prob < 1, got {self!r}"
            )

    @classmethod
    def parse(cls, text: str) -> DraftTree:
        """``BRANCHxNODES[:MINPROB]`` (e.g. ``3x10:0.05``), as bench flags and settings give it."""
        branch, nodes, min_prob = parse_draft_tree(text)
        return cls(branch=branch, nodes=nodes, min_prob=min_prob)

    def __str__(self) -> str:
        floor = f":{self.min_prob:g}" if self.min_prob else ""
        return f"{self.branch}x{self.nodes}{floor}"


@dataclass(frozen=True)
class TreeLayout:
    """Parent of each block entry: ``parents[0] == -1`` (the root), ``parents[i] < i``."""

    parents: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.parents or self.parents[0] != -1:
            raise ValueError(f"a tree block starts with its root (parent -1), got {self.parents}")
        for index, parent in enumerate(self.parents[1:], start=1):
            if not 0 <= parent < index:
                raise ValueError(f"entry {index} has parent {parent}; need 0 <= parent < {index}")

    @classmethod
    def from_proposal(cls, parents: tuple[int, ...]) -> TreeLayout:
        """A proposal's parents (-1 = the root, else a draft index) -> the block's layout."""
        return cls((-1, *(parent + 1 for parent in parents)))

    @cached_property
    def depths(self) -> list[int]:
        depths = [0]
        for parent in self.parents[1:]:
            depths.append(depths[parent] + 1)
        return depths

    @cached_property
    def children(self) -> list[list[int]]:
        children: list[list[int]] = [[] for _ in self.parents]
        for index, parent in enumerate(self.parents[1:], start=1):
            children[parent].append(index)
        return children

    @cached_property
    def ancestry(self) -> torch.Tensor:
        """``[T, T]`` bool: entry i sees entry j (j is i or one of its ancestors)."""
        size = len(self.parents)
        sees = torch.eye(size, dtype=torch.bool)
        for index, parent in enumerate(self.parents[1:], start=1):
            sees[index] |= sees[parent]
        return sees

    def positions(self, start: int) -> torch.Tensor:
        """Absolute positions ``[T]`` of the block written after ``start`` cached tokens."""
        return start + torch.tensor(self.depths, dtype=torch.long)

    def visibility(self, start: int) -> torch.Tensor:
        """``[T, start + T]`` bool: what each entry attends to after ``start`` cached tokens
        (the prefix, its ancestors and itself)."""
        size = len(self.parents)
        sees = torch.ones((size, start + size), dtype=torch.bool)
        sees[:, start:] = self.ancestry
        return sees


@dataclass(frozen=True)
class TreeVerdict:
    path: list[int]  # block indices of the accepted nodes, root excluded, top down
    bonus: int  # the token committed after them

    @property
    def accepted(self) -> int:
        return len(self.path)


def verify_tree_greedy(
    tokens: list[int], layout: TreeLayout, target_logits: torch.Tensor
) -> TreeVerdict:
    """tokens: the block's tokens (root first); target_logits: [T, vocab] at each entry."""
    assert target_logits.shape[0] == len(tokens) == len(layout.parents)
    choice = target_logits.argmax(dim=-1).tolist()  # [T]
    path: list[int] = []
    node = 0
    while True:
        child = next((c for c in layout.children[node] if tokens[c] == choice[node]), None)
        if child is None:
            return TreeVerdict(path=path, bonus=int(choice[node]))
        path.append(child)
        node = child


def verify_tree_sampling(
    tokens: list[int],
    layout: TreeLayout,
    p: torch.Tensor,  # [T, vocab] target probabilities after temperature/top-k/top-p
    generator: torch.Generator | None = None,
) -> TreeVerdict:
    """Deterministic candidates: multi-candidate rejection down the tree (module docstring)."""
    assert p.shape[0] == len(tokens) == len(layout.parents)
    device = generator.device if generator is not None else p.device
    path: list[int] = []
    node = 0
    while True:
        residual = p[node].clone()  # [vocab]
        accepted_child = None
        for child in layout.children[node]:
            total = residual.sum()
            u = torch.rand((), generator=generator, device=device).to(p.device)
            if u * total < residual[tokens[child]]:  # u < r(c) / sum(r)
                accepted_child = child
                break
            residual[tokens[child]] = 0.0
        if accepted_child is None:
            total = residual.sum()
            dist = residual / total if total > 0 else p[node]
            bonus = int(torch.multinomial(dist, 1, generator=generator).item())
            return TreeVerdict(path=path, bonus=bonus)
        path.append(accepted_child)
        node = accepted_child


__all__ = ["DraftTree", "TreeLayout", "TreeVerdict", "verify_tree_greedy", "verify_tree_sampling"]
