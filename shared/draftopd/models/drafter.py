"""The drafter seam: what every drafter family gives the rest of draftopd.

The decode engine, the bench, the rollouts, SFT and the Draft-OPD replay see a drafter only
through ``Drafter``. A new family (a block drafter, a tree drafter) is one module that subclasses
it, plus an entry in ``models.families``; nothing else in the tree changes. docs/design.md §2
describes the families.

Conventions shared by every family:
- The drafter reads the target's hidden features (``TargetModel.forward(want_features=True)``),
  shares the target's token embedding (attached, never saved) and predicts over a draft
  vocabulary of ``cfg.draft_vocab_size`` target ids: ``d2t`` maps draft ids to target ids, ``t2d``
  maps target ids to draft ids (-1 where absent).
- ``cfg`` is a frozen dataclass with ``architecture`` (the checkpoint tag), ``to_dict``, and the
  fields that tie it to a target (``hidden_size``, ``target_vocab_size``, ``feature_layers``,
  ``target_model``, ``target_fingerprint``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from draftopd.speculative.proposers import Proposer
    from draftopd.speculative.tree import DraftTree


class DrafterConfig(Protocol):
    """The fields of a family's config that code outside the family reads."""

    @property
    def architecture(self) -> str: ...
    @property
    def hidden_size(self) -> int: ...
    @property
    def target_vocab_size(self) -> int: ...
    @property
    def draft_vocab_size(self) -> int: ...
    @property
    def feature_layers(self) -> tuple[int, ...]: ...
    @property
    def target_model(self) -> str: ...
    @property
    def target_fingerprint(self) -> str: ...

    def to_dict(self) -> dict[str, Any]: ...


def target_shape(target_config: Any) -> dict[str, Any]:
    """The fields every family's config copies from the target's Hugging Face config: widths,
    heads, norm epsilon, rotary base and vocabulary size."""
    hidden = int(target_config.hidden_size)
    heads = int(target_config.num_attention_heads)
    rope = getattr(target_config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(target_config, "rope_theta", 10000.0))
    return {
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": int(getattr(target_config, "num_key_value_heads", heads)),
        "head_dim": int(getattr(target_config, "head_dim", None) or hidden // heads),
        "intermediate_size": int(target_config.intermediate_size),
        "rms_norm_eps": float(target_config.rms_norm_eps),
        "rope_theta": float(theta),
        "target_vocab_size": int(target_config.vocab_size),
    }


@dataclass(frozen=True)
class SFTLossOutput:
    """What a family's SFT objective returns for one batch."""

    loss: torch.Tensor  # [] differentiable
    step_loss: torch.Tensor  # [slots] mean loss per draft slot (detached)
    step_acc: torch.Tensor  # [slots] top-1 agreement with the target per draft slot


class Drafter(nn.Module, ABC):
    """Base class of every drafter family (an ``nn.Module`` with the methods below)."""

    cfg: DrafterConfig
    d2t: torch.Tensor  # [draft_vocab] target id of each draft id
    t2d: torch.Tensor  # [target_vocab] draft id of each target id, -1 if absent
    _embedding: list[nn.Embedding]  # the target's, kept out of state_dict

    def attach_embedding(self, embedding: nn.Embedding) -> None:
        """Share the target's (frozen) token embedding; it is never saved with the drafter."""
        if embedding.weight.shape != (self.cfg.target_vocab_size, self.cfg.hidden_size):
            raise ValueError(
                f"embedding shape {tuple(embedding.weight.shape)} does not match the drafter's "
                f"target ({self.cfg.target_vocab_size}, {self.cfg.hidden_size})"
            )
        self._embedding = [embedding]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The target's embedding of ``input_ids``."""
        if not self._embedding:
            raise ValueError("drafter has no embedding: call attach_embedding(target.embed_tokens)")
        return self._embedding[0](input_ids)

    def set_draft_vocab(self, target_ids: torch.Tensor) -> None:
        """Use ``target_ids`` (distinct, [draft_vocab]) as the draft vocabulary."""
        if (
            target_ids.numel() != self.cfg.draft_vocab_size
            or target_ids.unique().numel() != target_ids.numel()
        ):
            raise ValueError(f"draft vocab must be {self.cfg.draft_vocab_size} distinct target ids")
        self.d2t.copy_(target_ids)
        self.t2d.fill_(-1)
        self.t2d[target_ids] = torch.arange(target_ids.numel(), device=self.t2d.device)

    @property
    def max_draft_tokens(self) -> int | None:
        """The most drafts one cycle can propose (a block drafter: B - 1); None = no limit."""
        return None

    def drafts_per_cycle(self, k: int) -> int:
        """``k`` capped at ``max_draft_tokens``: what a cycle asked for K drafts proposes. The
        proposer caps the same way, so serving, rollouts, replay and tau agree."""
        cap = self.max_draft_tokens
        return k if cap is None else min(k, cap)

    @abstractmethod
    def proposer(
        self,
        *,
        argmax_drafting: bool = False,
        weights: str = "auto",
        stop_below: float = 0.0,
        tree: DraftTree | None = None,
    ) -> Proposer:
        """A fresh proposer for one request (the decode engine's side of the seam).

        ``weights`` is the decode-time precision of the drafter's weights (``DRAFT_WEIGHTS`` in
        bench_config.py); it moves acceptance at near-ties only, never the output.
        ``stop_below``: a cycle's drafts end before the first slot, after the first, where the
        drafter's most likely token has a probability below it (0 = always K). It reads the
        slot's distribution before any draw, so it never changes the output either
        (docs/engine.md). ``tree``: draft a dynamic tree of that shape instead of a chain
        (``speculative/tree.py``); a family that drafts chains only raises ValueError."""

    @abstractmethod
    def sft_loss(
        self,
        features: torch.Tensor,  # [batch, T, F] target features of input_ids
        input_ids: torch.Tensor,  # [batch, T] prompt + response, right-padded
        target_logits: torch.Tensor,  # [batch, T, V], or [batch, T, Vd] (see draft_vocab_logits)
        loss_mask: torch.Tensor,  # [batch, T] 1 on response tokens
        attention_mask: torch.Tensor,  # [batch, T] 1 on real tokens
        *,
        slots: int,  # draft slots trained per position (TTT depth for a chain drafter)
        decay: float,  # loss weight of slot j is decay ** j
        draft_vocab_logits: bool = False,  # logits already over the draft vocab, d2t order
        max_anchors: int = 0,  # block drafters: random response anchors per sequence (0 = all)
        generator: torch.Generator | None = None,  # draws those anchors
    ) -> SFTLossOutput:
        """The family's SFT objective on target-written sequences (a chain drafter trains every
        response position and ignores ``max_anchors``)."""

    @abstractmethod
    def draft_from_anchors(
        self,
        features: torch.Tensor,  # [batch, T, F] target features of input_ids
        input_ids: torch.Tensor,  # [batch, T]
        anchors: torch.Tensor,  # [batch, C] absolute anchor positions, 1 <= A <= T-1
        num_slots: int,  # K
        chain_inputs: torch.Tensor | None = None,  # [batch, C, K] tokens fed after each slot
    ) -> torch.Tensor:
        """Drafter logits [batch, C, K, draft_vocab] of a draft from every anchor, in batch.

        This is the replay of Draft-OPD and the batched drafting of greedy rollouts: it must put
        the drafter in exactly the state it had at inference when drafting from that anchor.
        ``chain_inputs`` are the tokens fed after slot k (the recorded proposals); ``None`` drafts
        freely (the drafter's own argmax), as its proposer does in greedy decoding. A block
        drafter ignores ``chain_inputs``: its slots are one parallel pass."""


__all__ = ["Drafter", "DrafterConfig", "SFTLossOutput", "target_shape"]
