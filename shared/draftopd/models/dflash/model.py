"""DFlash-style block drafter, written from the published description (docs/design.md §2).

A block drafter proposes a whole block in one parallel pass instead of one token per pass:

- **Context.** The target's hidden states at a few layers spread over its depth are concatenated
  and projected to H (``fc`` + ``context_norm``). In *every* drafter layer they are extra keys and
  values (each layer has its own k/v projections of the same context), at their own positions.
  They depend on the committed text only, so decoding caches them across cycles.
- **Block.** The input is ``[anchor token, MASK, ..., MASK]`` (B slots) at positions
  anchor .. anchor + B - 1, embedded with the target's (frozen, shared) embedding; the mask is the
  target's mask token where it has one, else a learned embedding.
- **Attention.** Block queries see every context position strictly before the anchor and every
  slot of their own block (bidirectional inside the block), nothing else.
- **Output.** Slot k (1 .. B-1) predicts the token at anchor + k through a draft-vocabulary head
  (``d2t``/``t2d`` as for EAGLE-3). Slot 0 (the anchor token itself) predicts nothing.

One forward serves every use: decoding (one block against the cached context), block SFT (many
anchors of one sequence at once) and the Draft-OPD replay (the records' anchors).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from draftopd.models.drafter import Drafter, target_shape
from draftopd.models.eagle3.model import RMSNorm, apply_rope


@dataclass(frozen=True)
class DFlashConfig:
    hidden_size: int  # H, equal to the target's hidden size
    num_attention_heads: int  # query heads
    num_key_value_heads: int  # key/value heads (grouped-query attention)
    head_dim: int  # per-head width
    intermediate_size: int  # SwiGLU MLP width
    rms_norm_eps: float  # RMSNorm epsilon
    rope_theta: float  # rotary base, copied from the target
    target_vocab_size: int  # V
    draft_vocab_size: int  # Vd <= V, size of the drafter's LM head
    feature_layers: tuple[int, ...]  # target layers whose hidden states form the context
    num_layers: int = 1  # drafter decoder layers
    block_size: int = 8  # B: the anchor slot + B - 1 drafted slots
    mask_token_id: int | None = None  # the target's mask token; None = a learned mask embedding
    target_model: str = ""  # name of the target the drafter was built for (informational)
    target_fingerprint: str = ""  # TargetModel.fingerprint of that target (checked on load)
    architecture: str = "dflash"  # checkpoint architecture tag

    def __post_init__(self) -> None:
        if self.num_layers < 1 or self.block_size < 2:
            raise ValueError(
                f"need num_layers >= 1 and block_size >= 2, got {self.num_layers}, "
                f"{self.block_size}"
            )
        if not 0 < self.draft_vocab_size <= self.target_vocab_size:
            raise ValueError(
                f"draft_vocab_size {self.draft_vocab_size} must be in [1, {self.target_vocab_size}]"
            )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["feature_layers"] = list(self.feature_layers)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DFlashConfig:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown DFlashConfig fields: {sorted(unknown)}")
        values = dict(data)
        values["feature_layers"] = tuple(values["feature_layers"])
        return cls(**values)

    @classmethod
    def for_target(
        cls,
        target_config: Any,
        *,
        feature_layers: tuple[int, ...],
        draft_vocab_size: int,
        target_model: str = "",
        target_fingerprint: str = "",
        num_layers: int = 1,
        block_size: int = 8,
        mask_token_id: int | None = None,
    ) -> DFlashConfig:
        return cls(
            **target_shape(target_config),
            draft_vocab_size=draft_vocab_size,
            feature_layers=tuple(feature_layers),
            num_layers=num_layers,
            block_size=block_size,
            mask_token_id=mask_token_id,
            target_model=target_model,
            target_fingerprint=target_fingerprint,
        )


@dataclass
class ContextCache:
    """Each layer's context keys and values ``[batch, kv_heads, T, head_dim]`` (RoPE applied),
    for the committed positions 0 .. T-1."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def length(self) -> int:
        return int(self.keys[0].shape[2]) if self.keys else 0

    def crop(self, length: int) -> None:
        self.keys = [k[:, :, :length] for k in self.keys]
        self.values = [v[:, :, :length] for v in self.values]


class DFlashLayer(nn.Module):
    def __init__(self, cfg: DFlashConfig) -> None:
        super().__init__()
        self.cfg = cfg
        hidden, kv = cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim
        self.input_layernorm = RMSNorm(hidden, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(hidden, cfg.num_attention_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv, bias=False)
        self.v_proj = nn.Linear(hidden, kv, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * cfg.head_dim, hidden, bias=False)
        self.post_attention_layernorm = RMSNorm(hidden, cfg.rms_norm_eps)
        self.gate_proj = nn.Linear(hidden, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, hidden, bias=False)

    def _heads(self, x: torch.Tensor, count: int) -> torch.Tensor:
        batch, seq, _ = x.shape
        return x.view(batch, seq, count, self.cfg.head_dim).transpose(1, 2)

    def context_kv(
        self, context: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [batch, kv, T, d] of projected context [batch, T, H] at ``positions``."""
        cfg = self.cfg
        k = apply_rope(self._heads(self.k_proj(context), cfg.num_key_value_heads), positions,
                       cfg.rope_theta)  # fmt: skip
        return k, self._heads(self.v_proj(context), cfg.num_key_value_heads)

    def forward(
        self,
        x: torch.Tensor,  # [batch, S, H] block slots (all blocks of the batch row, flattened)
        positions: torch.Tensor,  # [batch, S]
        context: tuple[torch.Tensor, torch.Tensor],  # this layer's context keys and values
        anchors: torch.Tensor | None,  # [batch, C] (S = C * B); None = every slot sees everything
    ) -> torch.Tensor:
        cfg = self.cfg
        normed = self.input_layernorm(x)
        q = apply_rope(self._heads(self.q_proj(normed), cfg.num_attention_heads), positions,
                       cfg.rope_theta)  # fmt: skip
        k = apply_rope(self._heads(self.k_proj(normed), cfg.num_key_value_heads), positions,
                       cfg.rope_theta)  # fmt: skip
        v = self._heads(self.v_proj(normed), cfg.num_key_value_heads)
        if anchors is None:
            out = F.scaled_dot_product_attention(
                q, torch.cat([context[0].to(k.dtype), k], dim=2),
                torch.cat([context[1].to(v.dtype), v], dim=2),
                enable_gqa=cfg.num_key_value_heads != cfg.num_attention_heads,
            )  # fmt: skip
        else:
            out = block_attention(q, k, v, context, anchors, cfg.block_size)
        batch, _, seq, _ = out.shape
        h = x + self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))
        normed = self.post_attention_layernorm(h)
        return h + self.down_proj(F.silu(self.gate_proj(normed)) * self.up_proj(normed))


def block_attention(
    q: torch.Tensor,  # [batch, heads, C * B, d] block queries (RoPE applied)
    k: torch.Tensor,  # [batch, kv_heads, C * B, d] block keys (RoPE applied)
    v: torch.Tensor,  # [batch, kv_heads, C * B, d]
    context: tuple[torch.Tensor, torch.Tensor],  # context keys/values [batch, kv_heads, T, d]
    anchors: torch.Tensor,  # [batch, C] absolute anchor positions
    block_size: int,
) -> torch.Tensor:
    """Attention [batch, heads, C * B, d] of every block under ``block_mask``'s rule, without the
    dense [C * B, T + C * B] score matrix: each slot scores the T context positions (those at or
    after its anchor masked) and the B slots of its own block, one softmax over both. The cost is
    C * B * (T + B) scores instead of C * B * (T + C * B); the rest of a block-SFT step (the
    draft-vocabulary head over every slot) is unchanged, so drawing fewer anchors
    (``--block-anchors``) is the larger saving."""
    batch, heads, slots, dim = q.shape
    kv_heads, blocks = k.shape[1], anchors.shape[1]
    group = heads // kv_heads
    ctx_k, ctx_v = context[0].to(k.dtype), context[1].to(v.dtype)
    length = ctx_k.shape[2]
    qg = q.reshape(batch, kv_heads, group * slots, dim) * dim**-0.5
    ctx_scores = (qg @ ctx_k.transpose(-1, -2)).view(
        batch, kv_heads, group, blocks, block_size, length
    )
    sees = torch.arange(length, device=q.device) < anchors[:, None, None, :, None, None]
    ctx_scores = ctx_scores.masked_fill(~sees, float("-inf"))
    qb = qg.view(batch, kv_heads, group, blocks, block_size, dim).transpose(2, 3)
    kb = k.view(batch, kv_heads, blocks, block_size, dim)
    vb = v.view(batch, kv_heads, blocks, block_size, dim)
    qb = qb.reshape(batch, kv_heads, blocks, group * block_size, dim)
    own_scores = (qb @ kb.transpose(-1, -2)).view(
        batch, kv_heads, blocks, group, block_size, block_size
    )
    scores = torch.cat([ctx_scores, own_scores.transpose(2, 3)], dim=-1)
    probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    p_ctx, p_own = probs.split([length, block_size], dim=-1)
    out = (p_ctx.reshape(batch, kv_heads, group * slots, length) @ ctx_v).view(
        batch, kv_heads, group, blocks, block_size, dim
    )
    p_own = p_own.transpose(2, 3).reshape(batch, kv_heads, blocks, group * block_size, block_size)
    own = (p_own @ vb).view(batch, kv_heads, blocks, group, block_size, dim).transpose(2, 3)
    return (out + own).reshape(batch, heads, slots, dim)


def block_mask(anchors: torch.Tensor, context_length: int, block_size: int) -> torch.Tensor:
    """Bool [batch, 1, C * B, T + C * B]: slot (c, k) sees context positions < anchors[c] and
    the B slots of its own block c. ``anchors``: [batch, C] absolute anchor positions."""
    batch, blocks = anchors.shape
    device = anchors.device
    slots = blocks * block_size
    block_of = torch.arange(slots, device=device) // block_size  # [C * B]
    anchor_of = anchors[:, block_of]  # [batch, C * B]
    sees_context = torch.arange(context_length, device=device)[None, None, :] < anchor_of[..., None]
    same_block = (block_of[:, None] == block_of[None, :]).expand(batch, slots, slots)
    return torch.cat([sees_context, same_block], dim=-1)[:, None]


class DFlashModule(Drafter):
    """The block drafter's modules and its batched forward; ``DFlashDrafter`` (``drafter.py``)
    adds the seam methods."""

    def __init__(self, cfg: DFlashConfig) -> None:
        super().__init__()
        self.cfg = cfg
        hidden = cfg.hidden_size
        self.fc = nn.Linear(len(cfg.feature_layers) * hidden, hidden, bias=False)
        self.context_norm = RMSNorm(hidden, cfg.rms_norm_eps)
        self.layers = nn.ModuleList(DFlashLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(hidden, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(hidden, cfg.draft_vocab_size, bias=False)
        if cfg.mask_token_id is None:
            self.mask_embedding = nn.Parameter(torch.zeros(hidden))
        self.register_buffer("d2t", torch.arange(cfg.draft_vocab_size), persistent=True)
        t2d = torch.full((cfg.target_vocab_size,), -1, dtype=torch.long)
        t2d[: cfg.draft_vocab_size] = torch.arange(cfg.draft_vocab_size)
        self.register_buffer("t2d", t2d, persistent=True)
        self._embedding: list[nn.Embedding] = []  # the target's, kept out of state_dict

    cfg: DFlashConfig

    @property
    def decoder_layers(self) -> list[DFlashLayer]:
        return [layer for layer in self.layers if isinstance(layer, DFlashLayer)]

    def context(self, features: torch.Tensor, start: int = 0) -> ContextCache:
        """Every layer's context keys/values of target ``features`` [batch, T, F] at positions
        start .. start + T - 1 (append them to a cache to extend it)."""
        batch, length, _ = features.shape
        ctx = self.context_norm(self.fc(features.to(self.fc.weight.dtype)))  # [b, T, H]
        positions = torch.arange(start, start + length, device=features.device).expand(batch, -1)
        pairs = [layer.context_kv(ctx, positions) for layer in self.decoder_layers]
        return ContextCache(keys=[k for k, _ in pairs], values=[v for _, v in pairs])

    def block_inputs(self, anchor_ids: torch.Tensor) -> torch.Tensor:
        """Embeddings [batch, C * B, H] of ``[anchor token, MASK x (B-1)]`` per anchor id
        ([batch, C])."""
        cfg = self.cfg
        batch, blocks = anchor_ids.shape
        anchor = self.embed(anchor_ids)  # [b, C, H]
        if cfg.mask_token_id is not None:
            mask_ids = torch.full_like(anchor_ids, cfg.mask_token_id)
            mask = self.embed(mask_ids)[:, :, None]  # [b, C, 1, H]
        else:
            mask = self.mask_embedding.to(anchor.dtype).expand(batch, blocks, 1, -1)
        slots = torch.cat([anchor[:, :, None], mask.expand(-1, -1, cfg.block_size - 1, -1)], 2)
        return slots.reshape(batch, blocks * cfg.block_size, -1)

    def blocks(
        self,
        context: ContextCache,
        anchor_ids: torch.Tensor,  # [batch, C] the token at each anchor
        anchors: torch.Tensor,  # [batch, C] absolute anchor positions (<= context length)
        *,
        all_context: bool = False,  # True: every block sees the whole context (decoding)
    ) -> torch.Tensor:
        """Logits [batch, C, B - 1, Vd] of slots 1 .. B-1 of every block, in one pass."""
        cfg = self.cfg
        batch, count = anchors.shape
        x = self.block_inputs(anchor_ids).to(self.fc.weight.dtype)
        offsets = torch.arange(cfg.block_size, device=anchors.device)
        positions = (anchors[..., None] + offsets).reshape(batch, count * cfg.block_size)
        rule = None if all_context and count == 1 else anchors
        for layer, k, v in zip(self.decoder_layers, context.keys, context.values, strict=True):
            x = layer(x, positions, (k, v), rule)
        x = x.view(batch, count, cfg.block_size, -1)[:, :, 1:]
        return self.lm_head(self.norm(x)).float()


__all__ = [
    "ContextCache",
    "DFlashConfig",
    "DFlashLayer",
    "DFlashModule",
    "block_attention",
    "block_mask",
]
