"""The DFlash drafter's decode-time pass for one sequence, on the native small-M kernel.

A DFlash proposal is one pass of B block slots through the drafter's layers against the cached
context; on a CPU its cost is reading the weights and the framework's per-op overhead, not
arithmetic. This pass computes ``DFlashModule.context`` and ``DFlashModule.blocks`` (one block,
decoding) with what the EAGLE-3 lean step uses (``models/lean_llama.py``):

- one preallocated ``StaticKVCache`` per drafter, a layer per drafter layer: positions
  ``[0, L)`` hold the committed context's keys/values; a proposal writes its block's keys and
  values at ``[L, L + B)`` as scratch and attends to ``[0, L + B)`` with no mask, which is exactly
  "context strictly before the anchor, and the whole block"; the next commit overwrites the
  scratch with the verified positions' context;
- fused k/v (context) and q/k/v (block) and gate/up products, the RMSNorms and residual adds
  fused into the products, a RoPE table built once;
- weights packed once, in float32, bfloat16 or int8 (``DRAFT_WEIGHTS``); as for EAGLE-3, the
  precision never reaches the output, which the target's verification decides.

tests/unit/models/test_dflash_lean.py compares it with the module's pass.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from draftopd.models.lean_llama import (
    WEIGHT_FORMATS,
    PackedLinear,
    StaticKVCache,
    grouped_attention,
    rms_norm,
    rope_tables,
)

if TYPE_CHECKING:
    from draftopd.models.dflash.model import DFlashModule

DRAFT_WEIGHTS = WEIGHT_FORMATS


def _vector(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().float().contiguous()


class LeanDFlash:
    def __init__(self, drafter: DFlashModule, kernel: ModuleType, *, weights: str) -> None:
        cfg = drafter.cfg
        self.cfg = cfg
        self.weights = weights
        self.heads, self.kv_heads, self.head_dim = (
            cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
        )  # fmt: skip
        self.eps = float(cfg.rms_norm_eps)
        if not drafter._embedding:
            raise ValueError("drafter has no embedding: call attach_embedding(target.embed_tokens)")
        embedding = drafter._embedding[0]
        self.linear = PackedLinear(kernel, self.eps, weights)
        pack = self.linear.prepare
        self.fc = pack(drafter.fc.weight)
        self.context_norm = _vector(drafter.context_norm.weight)
        self.layers = []
        for layer in drafter.decoder_layers:
            self.layers.append(
                {
                    "kv": pack(torch.cat([layer.k_proj.weight, layer.v_proj.weight])),
                    "qkv": pack(
                        torch.cat([layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight])
                    ),
                    "o": pack(layer.o_proj.weight),
                    "gate_up": pack(torch.cat([layer.gate_proj.weight, layer.up_proj.weight])),
                    "down": pack(layer.down_proj.weight),
                    "input_norm": _vector(layer.input_layernorm.weight),
                    "post_norm": _vector(layer.post_attention_layernorm.weight),
                }
            )
        self.norm = _vector(drafter.norm.weight)
        self.lm_head = pack(drafter.lm_head.weight)
        with torch.no_grad():  # the mask slots' embedding, fixed for a weight version
            if cfg.mask_token_id is not None:
                mask = embedding(torch.tensor([cfg.mask_token_id]))[0]
            else:
                mask = drafter.mask_embedding
            self.mask = mask.detach().float().clone()
        self.embedding = embedding  # the target's; no reference back to the drafter
        self._cos = self._sin = torch.empty(0)
        self._rope(1024)

    def _rope(self, positions: int) -> None:
        self._cos, self._sin = rope_tables(self.head_dim, self.cfg.rope_theta, positions)

    def _reserve(self, cache: StaticKVCache, end: int) -> None:
        cache.reserve(end)
        if end > self._cos.shape[0]:
            self._rope(max(end, 2 * self._cos.shape[0]))

    def new_cache(self, capacity: int = 1024) -> StaticKVCache:
        return StaticKVCache(
            layers=len(self.layers), kv_heads=self.kv_heads, head_dim=self.head_dim,
            capacity=capacity, dtype=torch.float32, device=torch.device("cpu"),
        )  # fmt: skip

    @torch.inference_mode()
    def extend(self, features: torch.Tensor, cache: StaticKVCache) -> None:
        """Append the context keys/values of target ``features`` [n, F] at positions
        cache.length .. (``DFlashModule.context``)."""
        steps, start = int(features.shape[0]), cache.length
        end = start + steps
        self._reserve(cache, end)
        ctx = rms_norm(self.linear(features.float(), self.fc), self.context_norm, self.eps)
        cos, sin = self._cos[start:end, None], self._sin[start:end, None]
        for index, layer in enumerate(self.layers):
            kv = self.linear(ctx, layer["kv"]).view(steps, 2 * self.kv_heads, self.head_dim)
            k = kv[:, : self.kv_heads]
            k = k * cos + k.roll(self.head_dim // 2, dims=-1) * sin
            cache.k[index, :, start:end] = k.transpose(0, 1)
            cache.v[index, :, start:end] = kv[:, self.kv_heads :].transpose(0, 1)
        cache.length = end

    @torch.inference_mode()
    def propose(self, anchor_token: int, slots: int, cache: StaticKVCache) -> torch.Tensor:
        """Draft logits [slots, Vd] of block slots 1..slots for the anchor at position
        cache.length (``DFlashModule.blocks`` with one block that sees the whole context)."""
        block = self.cfg.block_size
        start = cache.length
        end = start + block
        self._reserve(cache, end)
        anchor = self.embedding(torch.tensor([anchor_token])).float()  # [1, H]
        x = torch.cat([anchor, self.mask.expand(block - 1, -1)])  # [B, H]
        cos, sin = self._cos[start:end, None], self._sin[start:end, None]
        for index, layer in enumerate(self.layers):
            out = grouped_attention(
                self.linear(x, layer["qkv"], norm=layer["input_norm"]),
                cache.k[index], cache.v[index], start=start, heads=self.heads,
                cos=cos, folded_sin=sin, mask=None,
            )  # fmt: skip
            x = self.linear(out, layer["o"], residual=x)
            gate_up = self.linear(x, layer["gate_up"], norm=layer["post_norm"])
            inter = gate_up.shape[-1] // 2
            x = self.linear(F.silu(gate_up[:, :inter]) * gate_up[:, inter:], layer["down"],
                            residual=x)  # fmt: skip
        return self.linear(x[1 : slots + 1].contiguous(), self.lm_head, norm=self.norm)


__all__ = ["DRAFT_WEIGHTS", "LeanDFlash"]
