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

from draftopd.models.lean_llama import (
    WEIGHT_FORMATS,
    PackedLinear,
    StaticKVCache,
    causal_mask,
    grouped_attention,
    rms_norm,
    rope_tables,
    visibility_mask,
)

if TYPE_CHECKING:
    from draftopd.models.eagle3.model import Eagle3Config, Eagle3Drafter

DRAFT_WEIGHTS = WEIGHT_FORMATS


class LeanEagle3:
    def __init__(self, drafter: Eagle3Drafter, kernel: ModuleType, *, weights: str) -> None:
        cfg = cast("Eagle3Config", drafter.cfg)
        self.cfg = cfg
        self.weights = weights
        self.heads, self.kv_heads, self.head_dim = (
            cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
        )  # fmt: skip
        self.eps = float(cfg.rms_norm_eps)
        if not drafter._embedding:
            raise ValueError("drafter has no embedding: call attach_embedding(target.embed_tokens)")
        self.embedding = drafter._embedding[0]  # the target's; no reference back to the drafter
        self.linear = PackedLinear(kernel, self.eps, weights)
        attn, pack = drafter.self_attn, self.linear.prepare
        self.fc = pack(drafter.fc.weight)
        self.qkv = pack(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
        self.o = pack(attn.o_proj.weight)
        self.gate_up = pack(torch.cat([drafter.gate_proj.weight, drafter.up_proj.weight]))
        self.down = pack(drafter.down_proj.weight)
        self.lm_head = pack(drafter.lm_head.weight)
        self.norms = {
            name: getattr(drafter, name).weight.detach().float().contiguous()
            for name in ("input_layernorm", "hidden_norm", "post_attention_layernorm", "norm")
        }
        self._cos = self._sin = torch.empty(0)
        self._rope_table(1024)

    def _rope_table(self, positions: int) -> None:
        """apply_rope's cos and sin (models/eagle3/model.py), sin folded for the roll form."""
        self._cos, self._sin = rope_tables(self.head_dim, self.cfg.rope_theta, positions)

    def new_cache(self, capacity: int = 1024) -> StaticKVCache:
        return StaticKVCache(
            layers=1, kv_heads=self.kv_heads, head_dim=self.head_dim, capacity=capacity,
            dtype=torch.float32, device=torch.device("cpu"),
        )  # fmt: skip

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """[n, 3H] target features -> [n, H] (the drafter's ``fc``)."""
        return self.linear(features.float(), self.fc)

    @torch.inference_mode()
    def forward(
        self, hidden: torch.Tensor, ids: torch.Tensor, cache: StaticKVCache
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [n, H] and target ids [n] at positions cache.length.. -> (draft logits of the
        last position [Vd], the pre-norm hidden states [n, H])."""
        h = self._layer(hidden, ids, cache, positions=None, mask=None)
        logits = self.linear(h[-1:], self.lm_head, norm=self.norms["norm"])[0]  # [Vd]
        return logits, h

    @torch.inference_mode()
    def forward_rows(
        self,
        hidden: torch.Tensor,  # [n, H]
        ids: torch.Tensor,  # [n]
        cache: StaticKVCache,
        *,
        positions: torch.Tensor,  # [n] the position of each entry
        sees: torch.Tensor,  # [n, cache.length + n] bool: the entries each one attends to
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One tree level: n entries appended to the cache, each at its own position and with
        its own visibility (prefix, ancestors, itself) -> (logits [n, Vd], hidden [n, H])."""
        mask = visibility_mask(
            sees, group=self.heads // self.kv_heads, dtype=torch.float32, device=hidden.device
        )
        h = self._layer(hidden, ids, cache, positions=positions, mask=mask)
        return self.linear(h, self.lm_head, norm=self.norms["norm"]), h

    def _layer(
        self,
        hidden: torch.Tensor,
        ids: torch.Tensor,
        cache: StaticKVCache,
        *,
        positions: torch.Tensor | None,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """The decoder layer over n entries written at cache.length..: pre-norm hidden [n, H]."""
        steps, start = int(ids.shape[0]), cache.length
        end = start + steps
        cache.reserve(end)
        last = end if positions is None else int(positions.max().item()) + 1
        if last > self._cos.shape[0]:
            self._rope_table(max(last, 2 * self._cos.shape[0]))
        if positions is None:
            cos, sin = self._cos[start:end, None], self._sin[start:end, None]
        else:
            cos, sin = self._cos[positions, None], self._sin[positions, None]
        emb = self.embedding(ids).float()  # [n, H]
        norms = self.norms
        x = torch.cat(
            [
                rms_norm(emb, norms["input_layernorm"], self.eps),
                rms_norm(hidden, norms["hidden_norm"], self.eps),
            ],
            dim=-1,
        )  # [n, 2H]
        if mask is None:
            mask = causal_mask(
                start, steps, group=self.heads // self.kv_heads, dtype=torch.float32,
                device=x.device,
            )  # fmt: skip
        out = grouped_attention(
            self.linear(x, self.qkv), cache.k[0], cache.v[0], start=start, heads=self.heads,
            cos=cos, folded_sin=sin, mask=mask,
        )  # fmt: skip
        h = self.linear(out, self.o, residual=hidden)
        gate_up = self.linear(h, self.gate_up, norm=norms["post_attention_layernorm"])
        inter = gate_up.shape[-1] // 2
        h = self.linear(F.silu(gate_up[:, :inter]) * gate_up[:, inter:], self.down, residual=h)
        cache.length = end
        return h


__all__ = ["DRAFT_WEIGHTS", "LeanEagle3"]
