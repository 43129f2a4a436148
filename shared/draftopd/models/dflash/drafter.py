"""The DFlash block drafter behind the drafter seam: decoding, block SFT, and the replay.

- ``proposer``: one pass per cycle (``proposer.py``).
- ``sft_loss`` (the DFlash recipe, docs/draft_opd.md "Block drafters"): every response position
  of a sequence is an anchor (or a random draw of ``max_anchors`` of them per sequence); its
  block predicts the next B-1 target tokens from the context strictly before the anchor. Slot
  k's loss is the soft cross-entropy to the target's distribution of that token over the draft
  vocabulary, weighted ``decay ** (k-1)`` (the paper's ``exp(-(k-1)/gamma)`` is
  ``decay = exp(-1/gamma)``), normalised by the weights.
- ``draft_from_anchors``: the blocks of given anchors in one pass, exactly as decoding drafts
  them (the Draft-OPD replay; a block needs no chain inputs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from draftopd.models.dflash.model import DFlashConfig, DFlashModule
from draftopd.models.dflash.proposer import DFlashProposer
from draftopd.models.drafter import SFTLossOutput

if TYPE_CHECKING:
    from draftopd.models.dflash.lean import LeanDFlash
    from draftopd.speculative.tree import DraftTree

PROPOSER_WEIGHTS = ("auto", "module", "float32", "bfloat16", "int8")


class DFlashDrafter(DFlashModule):
    @property
    def max_draft_tokens(self) -> int:
        return self.cfg.block_size - 1

    def proposer(
        self,
        *,
        argmax_drafting: bool = False,
        weights: str = "auto",
        stop_below: float = 0.0,
        tree: DraftTree | None = None,
    ) -> DFlashProposer:
        """``weights``: "module" drafts with the module's pass; "float32", "bfloat16", "int8"
        with the lean pass in that precision, and "auto" in bfloat16, where the native kernel
        runs (a float32 CPU drafter); elsewhere every choice is the module's pass. A block
        drafter drafts one block per pass: no ``tree``."""
        if tree is not None:
            raise ValueError("the dflash family drafts one block per cycle, not a tree")
        if weights not in PROPOSER_WEIGHTS:
            raise ValueError(
                f"draft weights {weights!r} not supported by dflash; choose one of "
                f"{PROPOSER_WEIGHTS}"
            )
        return DFlashProposer(
            self,
            argmax_drafting=argmax_drafting,
            lean=self.lean_step(weights),
            stop_below=stop_below,
        )

    def lean_step(self, weights: str = "auto") -> LeanDFlash | None:
        """The lean decode-time pass (``lean.py``) or None (see ``proposer``)."""
        from draftopd.models.dflash.lean import LeanDFlash
        from draftopd.models.lean_llama import cached_lean_step

        embedding = self._embedding[0] if self._embedding else None
        return cached_lean_step(
            self, weights, lambda kernel, precision: LeanDFlash(self, kernel, weights=precision),
            embedding=embedding, strict=False,
        )  # fmt: skip

    def draft_from_anchors(
        self,
        features: torch.Tensor,  # [batch, T, F]
        input_ids: torch.Tensor,  # [batch, T]
        anchors: torch.Tensor,  # [batch, C] absolute anchor positions
        num_slots: int,
        chain_inputs: torch.Tensor | None = None,  # ignored: a block is one parallel pass
    ) -> torch.Tensor:
        if not 1 <= num_slots <= self.cfg.block_size - 1:
            raise ValueError(f"num_slots must be in [1, {self.cfg.block_size - 1}]")
        context = self.context(features)
        logits = self.blocks(context, input_ids.gather(1, anchors), anchors)
        return logits[:, :, :num_slots]  # [batch, C, K, Vd]

    def sft_loss(
        self,
        features: torch.Tensor,  # [batch, T, F]
        input_ids: torch.Tensor,  # [batch, T]
        target_logits: torch.Tensor,  # [batch, T, V] or [batch, T, Vd]
        loss_mask: torch.Tensor,  # [batch, T] 1 on response tokens
        attention_mask: torch.Tensor,  # [batch, T] 1 on real tokens (right-padded)
        *,
        slots: int,
        decay: float,
        draft_vocab_logits: bool = False,
        max_anchors: int = 0,
        generator: torch.Generator | None = None,
    ) -> SFTLossOutput:
        """Block SFT with every response position (that has a next token) as an anchor, or
        ``max_anchors`` of them per sequence drawn uniformly with ``generator`` (the DFlash
        recipe's random anchors). All B-1 slots come from the one pass and are all trained:
        ``slots`` (a chain drafter's TTT depth) does not apply."""
        slots = self.cfg.block_size - 1
        batch, length = input_ids.shape
        device = input_ids.device
        supervised = (loss_mask.bool() & attention_mask.bool()).to(device)  # [b, T]
        # anchor A is used when token A+1 is a supervised response token
        usable = torch.zeros_like(supervised)
        usable[:, :-1] = supervised[:, 1:]
        count = int(usable.sum(1).max())
        if count == 0:
            raise ValueError("no response position to anchor a block on")
        if max_anchors:  # a uniform draw of usable positions: random keys, usable ones first
            count = min(count, max_anchors)
            keys = torch.rand(usable.shape, generator=generator).to(device)
            order = torch.argsort(keys + (~usable).float(), dim=1)[:, :count]
        else:
            order = torch.argsort((~usable).to(torch.int8), dim=1, stable=True)[:, :count]
        anchors = order  # [b, C] usable positions first (padded with unusable ones)
        valid_anchor = usable.gather(1, anchors)  # [b, C]
        logits = self.draft_from_anchors(features, input_ids, anchors, slots)  # [b, C, K, Vd]
        with torch.no_grad():
            teacher = target_logits.float()
            if not draft_vocab_logits:
                teacher = teacher.index_select(-1, self.d2t)
            p = torch.softmax(teacher, dim=-1)  # [b, T, Vd]: position t predicts token t+1
        k = torch.arange(1, slots + 1, device=device)
        token_pos = anchors[..., None] + k  # [b, C, K] position of the predicted token
        inside = token_pos < length
        clamped = token_pos.clamp(max=length - 1)
        valid = (
            valid_anchor[..., None]
            & inside
            & supervised.gather(1, clamped.view(batch, -1)).view_as(clamped)
        )
        p_slot = p.gather(  # the target's distribution of the token at A+k, from position A+k-1
            1, (clamped - 1).view(batch, -1, 1).expand(-1, -1, p.shape[-1])
        ).view(*clamped.shape, -1)
        ce = torch.logsumexp(logits, dim=-1) - (p_slot * logits).sum(-1)  # [b, C, K]
        ce = torch.where(valid, ce, torch.zeros_like(ce))
        counts = valid.sum((0, 1)).float()  # [K]
        step_loss = ce.sum((0, 1)) / counts.clamp(min=1)
        agree = (logits.argmax(-1) == p_slot.argmax(-1)) & valid
        step_acc = agree.sum((0, 1)).float() / counts.clamp(min=1)
        weights = decay ** (k - 1).float()
        loss = (weights * step_loss).sum() / weights.sum()
        return SFTLossOutput(loss=loss, step_loss=step_loss.detach(), step_acc=step_acc.detach())


def random_dflash(cfg: DFlashConfig, *, seed: int = 0, std: float = 0.02) -> DFlashDrafter:
    """A randomly initialised block drafter (reproducible from ``seed``)."""
    generator = torch.Generator().manual_seed(seed)
    drafter = DFlashDrafter(cfg)
    with torch.no_grad():
        for name, param in drafter.named_parameters():
            if (name.endswith("weight") and param.ndim == 2) or name == "mask_embedding":
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return drafter


__all__ = ["DFlashDrafter", "random_dflash"]
