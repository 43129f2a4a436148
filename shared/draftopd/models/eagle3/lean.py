"""The EAGLE-3 drafter's decode-time forward for one sequence, on the native small-M kernel.

Drafting is a chain of single-token forwards, each reading all of the drafter's weights; on a CPU
that read is the cost (the draft LM head alone is 74 MB in float32 for a 32k draft vocabulary).
This forward computes ``Eagle3Drafter.forward`` with:
- a preallocated KV cache (``StaticKVCache``, one layer) instead of ``torch.cat`` per step;
- a RoPE table built once with the drafter's own formula;
- fused q/k/v and gate/up matrices, the RMSNorms and residual adds fused into the products;
- weights packed once, in float32, bfloat16 or int8 with a scale per output row
  (``DRAFT_WEIGHTS``). bfloat16 halves the bytes each drafting step reads, int8 quarters them.
  The drafter's precision never touches the output, which the target's verification decides
  (greedy: token-identical; sampling: q is what the drafts were drawn from); it only moves
  acceptance, where two draft tokens are nearly tied (bfloat16) or close (int8).

tests/unit/models/eagle3/test_lean.py compares it with the module forward.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F

from draftopd.models.lean_llama import StaticKVCache

if TYPE_CHECKING:
    from draftopd.models.eagle3.model import Eagle3Config, Eagle3Drafter

DRAFT_WEIGHTS = ("float32", "bfloat16", "int8")


class LeanEagle3:
    def __init__(self, drafter: Eagle3Drafter, kernel: ModuleType, *, weights: str) -> None:
        if weights not in DRAFT_WEIGHTS:
            raise ValueError(f"weights {weights!r} not supported; choose one of {DRAFT_WEIGHTS}")
        cfg = cast("Eagle3Config", drafter.cfg)
        self.cfg = cfg
        self.kernel = kernel
        self.weights = weights
        self.heads, self.kv_heads, self.head_dim = (
            cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
        )  # fmt: skip
        self.eps = float(cfg.rms_norm_eps)
        if not drafter._embedding:
            raise ValueError("drafter has no embedding: call attach_embedding(target.embed_tokens)")
        self.embedding = drafter._embedding[0]  # the target's; no reference back to the drafter
        self.widths: dict[int, int] = {}
        self.scales: dict[int, torch.Tensor] = {}  # int8 only: per-output-row scales
        attn = drafter.self_attn
        self.fc = self._pack(drafter.fc.weight)
        self.qkv = self._pack(
            torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        )
        self.o = self._pack(attn.o_proj.weight)
        self.gate_up = self._pack(torch.cat([drafter.gate_proj.weight, drafter.up_proj.weight]))
        self.down = self._pack(drafter.down_proj.weight)
        self.lm_head = self._pack(drafter.lm_head.weight)
        self.norms = {
            name: getattr(drafter, name).weight.detach().float().contiguous()
            for name in ("input_layernorm", "hidden_norm", "post_attention_layernorm", "norm")
        }
        self._cos = self._sin = torch.empty(0)
        self._rope_table(1024)

    def _pack(self, weight: torch.Tensor) -> torch.Tensor:
        weight = weight.detach().float()
        if self.weights == "int8":
            packed, scales = self.kernel.pack_int8(weight)
            self.scales[id(packed)] = scales
        else:
            packed = self.kernel.pack(weight, self.weights == "bfloat16")
        self.widths[id(packed)] = int(weight.shape[0])
        return packed

    def _linear(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        *,
        norm: str | None = None,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        scale = self.norms[norm] if norm is not None else None
        n, scales = self.widths[id(weight)], self.scales.get(id(weight))
        return self.kernel.linear(x, weight, n, scale, self.eps, residual, scales)

    def _rope_table(self, positions: int) -> None:
        """apply_rope's cos and sin (models/eagle3/model.py), sign-folded for the roll form."""
        dim = self.head_dim
        arange = torch.arange(0, dim, 2, dtype=torch.float32)
        inv_freq = 1.0 / (self.cfg.rope_theta ** (arange / dim))
        angles = torch.arange(positions, dtype=torch.float32)[:, None] * inv_freq  # [P, dim/2]
        emb = torch.cat([angles, angles], dim=-1)  # [P, dim]
        sign = torch.ones(dim)
        sign[: dim // 2] = -1
        self._cos, self._sin = emb.cos(), emb.sin() * sign

    def new_cache(self, capacity: int = 1024) -> StaticKVCache:
        return StaticKVCache(
            layers=1, kv_heads=self.kv_heads, head_dim=self.head_dim, capacity=capacity,
            dtype=torch.float32, device=torch.device("cpu"),
        )  # fmt: skip

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """[n, 3H] target features -> [n, H] (the drafter's ``fc``)."""
        return self._linear(features.float(), self.fc)

    @torch.inference_mode()
    def forward(
        self, hidden: torch.Tensor, ids: torch.Tensor, cache: StaticKVCache
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [n, H] and target ids [n] at positions cache.length.. -> (draft logits of the
        last position [Vd], the pre-norm hidden states [n, H])."""
        steps, start = int(ids.shape[0]), cache.length
        end = start + steps
        cache.reserve(end)
        if end > self._cos.shape[0]:
            self._rope_table(max(end, 2 * self._cos.shape[0]))
        emb = self.embedding(ids).float()  # [n, H]
        x = torch.cat(
            [self._norm(emb, "input_layernorm"), self._norm(hidden, "hidden_norm")], dim=-1
        )  # [n, 2H]
        h = self._attention(x, hidden, cache, start=start, end=end)
        gate_up = self._linear(h, self.gate_up, norm="post_attention_layernorm")
        inter = gate_up.shape[-1] // 2
        h = self._linear(F.silu(gate_up[:, :inter]) * gate_up[:, inter:], self.down, residual=h)
        cache.length = end
        logits = self._linear(h[-1:], self.lm_head, norm="norm")[0]  # [Vd]
        return logits, h

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        return (x * torch.rsqrt(variance + self.eps)) * self.norms[name]

    def _attention(
        self, x: torch.Tensor, hidden: torch.Tensor, cache: StaticKVCache, *, start: int, end: int
    ) -> torch.Tensor:
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        steps = end - start
        qkv = self._linear(x, self.qkv)  # [n, (heads + 2 kv) * dim]
        qk = qkv[:, : (heads + kv_heads) * dim].view(steps, heads + kv_heads, dim)
        cos, sin = self._cos[start:end, None], self._sin[start:end, None]
        qk = qk * cos + qk.roll(dim // 2, dims=-1) * sin
        cache.k[0, :, start:end] = qk[:, heads:].transpose(0, 1)
        v = qkv[:, (heads + kv_heads) * dim :].view(steps, kv_heads, dim)
        cache.v[0, :, start:end] = v.transpose(0, 1)
        group = heads // kv_heads
        q = qk[:, :heads].view(steps, kv_heads, group, dim).permute(1, 2, 0, 3)
        q = q.reshape(1, kv_heads, group * steps, dim)
        mask = None
        if steps > 1:
            keys = torch.arange(end)
            blocked = keys[None, :] > torch.arange(start, end)[:, None]  # [n, end]
            mask = torch.zeros(blocked.shape).masked_fill_(blocked, float("-inf")).repeat(group, 1)
        out = F.scaled_dot_product_attention(
            q, cache.k[:1, :, :end], cache.v[:1, :, :end], attn_mask=mask
        )  # [1, kv, group * n, dim]
        out = out.view(kv_heads, group, steps, dim).permute(2, 0, 1, 3).reshape(steps, heads * dim)
        return self._linear(out, self.o, residual=hidden)


__all__ = ["DRAFT_WEIGHTS", "LeanEagle3"]
