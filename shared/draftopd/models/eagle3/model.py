"""EAGLE-3-style drafter (Li et al., EAGLE-3, 2025), written from the paper's description.

The first family behind the drafter seam (``models/drafter.py``).

- Three target layers (low, mid, high) are concatenated and projected 3H -> H by ``fc``.
- One decoder layer reads [embedding of the token ; hidden] (2H wide) and writes an H residual.
- From the second draft step on, the hidden input is the drafter's own previous output.
- The LM head covers a reduced draft vocabulary; ``d2t`` maps draft ids to target ids and ``t2d``
  maps target ids to draft ids (-1 where a target token is not in the draft vocabulary).
- The token embedding is the target's own (shared and frozen, never saved with the drafter).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from draftopd.models.drafter import Drafter, SFTLossOutput, target_shape

if TYPE_CHECKING:
    from draftopd.models.eagle3.lean import LeanEagle3
    from draftopd.models.eagle3.proposer import Eagle3Proposer
    from draftopd.speculative.tree import DraftTree


@dataclass(frozen=True)
class Eagle3Config:
    hidden_size: int  # H, equal to the target's hidden size
    num_attention_heads: int  # query heads of the drafter's attention
    num_key_value_heads: int  # key/value heads (grouped-query attention)
    head_dim: int  # per-head width
    intermediate_size: int  # SwiGLU MLP width
    rms_norm_eps: float  # RMSNorm epsilon
    rope_theta: float  # rotary base, copied from the target
    target_vocab_size: int  # V, size of the target vocabulary
    draft_vocab_size: int  # Vd <= V, size of the drafter's LM head
    feature_layers: tuple[int, int, int]  # target layers fused as (low, mid, high)
    target_model: str = ""  # name of the target the drafter was built for (informational)
    target_fingerprint: str = ""  # TargetModel.fingerprint of that target (checked on load)
    architecture: str = "eagle3"  # checkpoint architecture tag

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["feature_layers"] = list(self.feature_layers)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Eagle3Config:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown Eagle3Config fields: {sorted(unknown)}")
        values = dict(data)
        values["feature_layers"] = tuple(values["feature_layers"])
        return cls(**values)

    @classmethod
    def for_target(
        cls,
        target_config: Any,
        *,
        feature_layers: tuple[int, int, int],
        draft_vocab_size: int,
        target_model: str = "",
        target_fingerprint: str = "",
    ) -> Eagle3Config:
        shape = target_shape(target_config)
        vocab = shape["target_vocab_size"]
        if not 0 < draft_vocab_size <= vocab:
            raise ValueError(f"draft_vocab_size {draft_vocab_size} must be in [1, {vocab}]")
        return cls(
            **shape,
            draft_vocab_size=draft_vocab_size,
            feature_layers=feature_layers,
            target_model=target_model,
            target_fingerprint=target_fingerprint,
        )


@dataclass
class DrafterCache:
    """The drafter's own KV cache for its single layer."""

    keys: torch.Tensor | None = None  # [batch, kv_heads, length, head_dim]
    values: torch.Tensor | None = None  # [batch, kv_heads, length, head_dim]

    @property
    def length(self) -> int:
        return 0 if self.keys is None else int(self.keys.shape[2])

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys is None or self.values is None:
            self.keys, self.values = k, v
        else:
            self.keys = torch.cat([self.keys, k], dim=2)
            self.values = torch.cat([self.values, v], dim=2)
        return self.keys, self.values

    def crop(self, length: int) -> None:
        if self.keys is not None and self.values is not None:
            self.keys = self.keys[:, :, :length]
            self.values = self.values[:, :, :length]


@dataclass(frozen=True)
class DrafterOutput:
    logits: torch.Tensor  # [batch, seq, draft_vocab]
    hidden: torch.Tensor  # [batch, seq, H], pre-norm residual stream fed back at the next step


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(variance + self.eps)).to(x.dtype) * self.weight


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding (Llama layout). x: [batch, heads, seq, head_dim]."""
    dim = x.shape[-1]
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim)
    )
    angles = positions.to(torch.float32)[..., None] * inv_freq  # [batch, seq, dim/2]
    emb = torch.cat([angles, angles], dim=-1)[:, None]  # [batch, 1, seq, dim]
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    return x * cos + _rotate_half(x) * sin


class DraftAttention(nn.Module):
    def __init__(self, cfg: Eagle3Config) -> None:
        super().__init__()
        self.cfg = cfg
        wide = 2 * cfg.hidden_size
        self.q_proj = nn.Linear(wide, cfg.num_attention_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(wide, cfg.num_key_value_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(wide, cfg.num_key_value_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cache: DrafterCache | None,
        attn_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        batch, seq, _ = x.shape  # x: [batch, seq, 2H]
        cfg = self.cfg
        q = self.q_proj(x).view(batch, seq, cfg.num_attention_heads, cfg.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
        q, k = apply_rope(q, positions, cfg.rope_theta), apply_rope(k, positions, cfg.rope_theta)
        past = 0 if cache is None else cache.length
        if cache is not None:
            k, v = cache.append(k, v)
        if attn_mask is None and (seq > 1 or past > 0):
            # causal over [cache ; new]: query i sees keys 0 .. past + i
            keys = torch.arange(past + seq, device=x.device)
            attn_mask = keys[None, :] <= (past + torch.arange(seq, device=x.device))[:, None]
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            enable_gqa=cfg.num_key_value_heads != cfg.num_attention_heads,
        )  # [batch, heads, seq, head_dim]
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class Eagle3Drafter(Drafter):
    def __init__(self, cfg: Eagle3Config) -> None:
        super().__init__()
        self.cfg = cfg
        hidden = cfg.hidden_size
        self.fc = nn.Linear(3 * hidden, hidden, bias=False)
        self.input_layernorm = RMSNorm(hidden, cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(hidden, cfg.rms_norm_eps)
        self.self_attn = DraftAttention(cfg)
        self.post_attention_layernorm = RMSNorm(hidden, cfg.rms_norm_eps)
        self.gate_proj = nn.Linear(hidden, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, hidden, bias=False)
        self.norm = RMSNorm(hidden, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(hidden, cfg.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.arange(cfg.draft_vocab_size), persistent=True)
        t2d = torch.full((cfg.target_vocab_size,), -1, dtype=torch.long)
        t2d[: cfg.draft_vocab_size] = torch.arange(cfg.draft_vocab_size)
        self.register_buffer("t2d", t2d, persistent=True)
        self._embedding: list[nn.Embedding] = []  # the target's, kept out of state_dict

    d2t: torch.Tensor  # [draft_vocab] target id of each draft id
    t2d: torch.Tensor  # [target_vocab] draft id of each target id, -1 if absent

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Fuse the target's low/mid/high hidden states: [batch, seq, 3H] -> [batch, seq, H]."""
        return self.fc(features.to(self.fc.weight.dtype))

    def forward(
        self,
        hidden: torch.Tensor,  # [batch, seq, H]: projected target features or own previous hidden
        input_ids: torch.Tensor,  # [batch, seq] target ids of the tokens paired with ``hidden``
        positions: torch.Tensor,  # [batch, seq] absolute positions
        *,
        cache: DrafterCache | None = None,
        attn_mask: torch.Tensor | None = None,  # bool [seq, keys] or [batch, 1, seq, keys]
    ) -> DrafterOutput:
        h = self.layer(hidden, input_ids, positions, cache=cache, attn_mask=attn_mask)
        return DrafterOutput(logits=self.logits(h), hidden=h)

    def layer(
        self,
        hidden: torch.Tensor,  # [batch, seq, H]
        input_ids: torch.Tensor,  # [batch, seq]
        positions: torch.Tensor,  # [batch, seq]
        *,
        cache: DrafterCache | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The decoder layer alone: the output hidden states [batch, seq, H] (no LM head)."""
        emb = self.embed(input_ids).to(hidden.dtype)
        x = torch.cat([self.input_layernorm(emb), self.hidden_norm(hidden)], dim=-1)  # [b, s, 2H]
        h = hidden + self.self_attn(x, positions, cache, attn_mask)
        normed = self.post_attention_layernorm(h)
        return h + self.down_proj(F.silu(self.gate_proj(normed)) * self.up_proj(normed))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits (float32) of hidden states [..., H]."""
        return self.lm_head(self.norm(h)).float()

    def lean_step(self, weights: str = "auto") -> LeanEagle3 | None:
        """The lean decode-time forward with ``weights`` ("float32", "bfloat16", "auto" =
        bfloat16 where it applies), or None for "module" or where the native kernel does not
        apply (not a float32 CPU drafter, no kernel). Built once per weight version: an
        optimizer step bumps the parameters' versions, so training never drafts with stale
        packed weights."""
        from draftopd.models.eagle3.lean import LeanEagle3
        from draftopd.models.lean_llama import cached_lean_step

        embedding = self._embedding[0] if self._embedding else None
        return cached_lean_step(
            self, weights, lambda kernel, precision: LeanEagle3(self, kernel, weights=precision),
            embedding=embedding,
        )  # fmt: skip

    # -- the Drafter seam (models/drafter.py) --------------------------------------------------
    def proposer(
        self,
        *,
        argmax_drafting: bool = False,
        weights: str = "auto",
        stop_below: float = 0.0,
        tree: DraftTree | None = None,
    ) -> Eagle3Proposer:
        from draftopd.models.eagle3.proposer import Eagle3Proposer

        if tree is not None:
            from draftopd.models.eagle3.tree import Eagle3TreeProposer

            if stop_below > 0:
                raise ValueError("a draft tree and a confidence floor (stop_below) do not combine")
            return Eagle3TreeProposer(self, tree=tree, weights=weights)
        return Eagle3Proposer(
            self, argmax_drafting=argmax_drafting, weights=weights, stop_below=stop_below
        )

    def sft_loss(
        self,
        features: torch.Tensor,
        input_ids: torch.Tensor,
        target_logits: torch.Tensor,
        loss_mask: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        slots: int,
        decay: float,
        draft_vocab_logits: bool = False,
        max_anchors: int = 0,
        generator: torch.Generator | None = None,
    ) -> SFTLossOutput:
        """Training-time test over ``slots`` unrolled steps (``ttt.py``), at every position."""
        from draftopd.models.eagle3.ttt import ttt_unroll

        out = ttt_unroll(
            self, features, input_ids, target_logits, loss_mask, attention_mask,
            steps=slots, decay=decay, draft_vocab_logits=draft_vocab_logits,
        )  # fmt: skip
        return SFTLossOutput(loss=out.loss, step_loss=out.step_loss, step_acc=out.step_acc)

    def draft_from_anchors(
        self,
        features: torch.Tensor,
        input_ids: torch.Tensor,
        anchors: torch.Tensor,
        num_slots: int,
        chain_inputs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        from draftopd.models.eagle3.unroll import unroll_from_anchors

        return unroll_from_anchors(self, features, input_ids, anchors, num_slots, chain_inputs)


def random_drafter(cfg: Eagle3Config, *, seed: int = 0, std: float = 0.02) -> Eagle3Drafter:
    """A randomly initialised drafter (reproducible from ``seed``)."""
    generator = torch.Generator().manual_seed(seed)
    drafter = Eagle3Drafter(cfg)
    with torch.no_grad():
        for name, param in drafter.named_parameters():
            if name.endswith("weight") and param.ndim == 2:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return drafter


__all__ = ["DrafterCache", "DrafterOutput", "Eagle3Config", "Eagle3Drafter", "random_drafter"]
