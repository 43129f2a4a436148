"""A lean single-sequence forward for Llama-family targets, with a preallocated KV cache.

The decode loop runs one sequence and feeds 1 token (plain) or K + 1 tokens (verification) per
step. Hugging Face's forward spends most of such a step outside the matrix products: module calls,
mask and RoPE construction, cache concatenation (docs/engine.md measures it). This forward computes
the same function with the same weights:
- q/k/v and gate/up are fused into one matrix each, so a layer makes four matrix products;
- RoPE cos/sin come from a table built once by the model's own rotary module;
- K/V go into a preallocated (static) cache; a rejection crops it by moving ``length``;
- grouped-query attention folds the query heads of a group into one SDPA call per KV head group,
  so the cache is never repeated;
- on CPU in float32 the matrix products go through a native small-M GEMM (``draftopd/kernels``)
  that streams each weight once for all rows, so verifying K + 1 tokens costs little more than
  one token; elsewhere (GPU, bf16, no compiler) they go through ``F.linear``.

Only floating-point reassociation separates it from the reference: tests/unit/models/
test_lean_llama.py compares logits and greedy tokens against Hugging Face's forward.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from draftopd.kernels import small_gemm
from draftopd.speculative.tree import TreeLayout

T = TypeVar("T")

_SUPPORTED_ROPE = ("default", "linear", "llama3", "yarn", "longrope")
KERNELS = ("auto", "native", "torch")


def lean_unsupported_reason(model: PreTrainedModel) -> str | None:
    """Why ``LeanLlama`` cannot run this model (None: it can)."""
    config = model.config
    if getattr(config, "model_type", None) != "llama":
        return f"model_type {getattr(config, 'model_type', None)!r} is not 'llama'"
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "biased attention or MLP projections"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r} is not silu"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "pretraining_tp != 1"
    rope_type = getattr(model.model.rotary_emb, "rope_type", "default")
    if rope_type not in _SUPPORTED_ROPE:
        return f"rope type {rope_type!r} depends on the sequence length"
    return None


def select_kernel(kernel: str, weight: torch.Tensor) -> ModuleType | None:
    """The native small-M GEMM for ``kernel`` "native" (required) or "auto" (where it applies:
    float32 on a CPU that can build it); None means ``F.linear``."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel {kernel!r} not supported; choose one of {KERNELS}")
    if kernel == "torch":
        return None
    applies = weight.device.type == "cpu" and weight.dtype == torch.float32
    module = small_gemm() if applies else None
    if module is None and kernel == "native":
        raise ValueError(
            "kernel 'native' needs a float32 target on an x86-64 CPU with AVX2/FMA and a C++ "
            "compiler (see draftopd/kernels); use 'auto' or 'torch'"
        )
    return module


# module -> ((precision, embedding, parameter versions), its lean decode-time step)
_LEAN_STEPS: weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple[Any, ...], Any]] = (
    weakref.WeakKeyDictionary()
)


def cached_lean_step(
    module: torch.nn.Module,
    weights: str,
    build: Callable[[ModuleType, str], T],
    *,
    embedding: torch.nn.Module | None,
    strict: bool = True,
) -> T | None:
    """A drafter's lean decode-time step with ``weights`` ("float32", "bfloat16", "int8", or
    "auto" = bfloat16 where it applies), built by ``build(kernel, precision)``; None for
    "module" or where the native kernel does not apply (not a float32 CPU drafter, no kernel:
    an error for an explicit precision when ``strict``). Built once per weight version: an
    optimizer step bumps the parameters' versions, so training never drafts with stale packed
    weights. Held beside the module (a weak map): copies and pickles skip it."""
    choices = ("auto", "module", *WEIGHT_FORMATS)
    if weights not in choices:
        raise ValueError(f"draft weights {weights!r} not supported; choose one of {choices}")
    if weights == "module":
        return None
    kernel = select_kernel("auto", next(module.parameters()))
    if kernel is None:
        if weights != "auto" and strict:
            raise ValueError(f"draft weights {weights!r} need the native CPU kernel")
        return None
    precision = "bfloat16" if weights == "auto" else weights
    key = (precision, id(embedding), tuple(p._version for p in module.parameters()))
    cached = _LEAN_STEPS.get(module)
    if cached is None or cached[0] != key:
        cached = (key, build(kernel, precision))
        _LEAN_STEPS[module] = cached
    step: T = cached[1]
    return step


class StaticKVCache:
    """K and V of one sequence, preallocated: ``[kv_heads, capacity, head_dim]`` per layer.

    Positions ``[0, length)`` are valid. ``crop`` only moves ``length``; the next step overwrites
    the dropped slots. The capacity doubles when a step would overflow it."""

    def __init__(self, *, layers: int, kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device) -> None:  # fmt: skip
        self.length = 0
        shape = (layers, kv_heads, max(capacity, 1), head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)

    @property
    def capacity(self) -> int:
        return int(self.k.shape[2])

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, length: int) -> None:
        if not length >= 0:
            raise ValueError(f"cannot crop a KV cache to a negative length ({length})")
        self.length = min(self.length, length)

    def keep(self, start: int, entries: list[int]) -> None:
        """After a tree block written at ``start``: keep its ``entries`` (block indices, in
        order, each below the next's position), moved to ``start, start + 1, ...``, and drop
        the rest. Their keys already carry the RoPE of those positions (a node's depth)."""
        index = torch.tensor(entries, dtype=torch.long, device=self.k.device) + start
        end = start + len(entries)
        if not (start <= self.length and end <= self.length):
            raise ValueError(f"cannot keep {len(entries)} entries after {start} of {self.length}")
        for name in ("k", "v"):
            cache = getattr(self, name)
            cache[:, :, start:end] = cache[:, :, index]
        self.length = end

    def reserve(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        capacity = max(needed, 2 * self.capacity)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_empty((old.shape[0], old.shape[1], capacity, old.shape[3]))
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)


@dataclass(frozen=True)
class _Layer:
    input_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # [(heads + 2 * kv_heads) * head_dim, hidden] (or its packing)
    o: torch.Tensor  # [hidden, heads * head_dim]
    post_norm: torch.Tensor  # [hidden]
    gate_up: torch.Tensor  # [2 * intermediate, hidden]
    down: torch.Tensor  # [hidden, intermediate]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm: in float32, the weight applied after the cast back."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


WEIGHT_FORMATS = ("float32", "bfloat16", "int8")  # how PackedLinear stores a weight


class PackedLinear:
    """``[residual +] rms_norm?(x) @ w.T`` through torch ops or the native small-M kernel, which
    fuses the norm and the residual add into the product. Weights are packed once, in float32,
    bfloat16 or int8 with a scale per output row (the last two only on the kernel)."""

    def __init__(self, kernel: ModuleType | None, eps: float, weights: str = "float32") -> None:
        if weights not in WEIGHT_FORMATS:
            raise ValueError(f"weights {weights!r} not supported; choose one of {WEIGHT_FORMATS}")
        if kernel is None and weights != "float32":
            raise ValueError(f"{weights} weights need the native kernel")
        self.kernel = kernel
        self.eps = eps
        self.weights = weights
        self.widths: dict[int, int] = {}  # id(packed weight) -> output width N
        self.scales: dict[int, torch.Tensor] = {}  # id(int8 packed weight) -> row scales

    def prepare(self, weight: torch.Tensor) -> torch.Tensor:
        weight = weight.detach().contiguous()
        if self.kernel is None:
            return weight
        if self.weights == "int8":
            packed, scales = self.kernel.pack_int8(weight.float())
            self.scales[id(packed)] = scales
        else:
            packed = self.kernel.pack(weight.float(), self.weights == "bfloat16")
        self.widths[id(packed)] = int(weight.shape[0])
        return packed

    def __call__(
        self,
        x: torch.Tensor,  # [T, in]
        weight: torch.Tensor,
        *,
        norm: torch.Tensor | None = None,  # RMSNorm weight applied to x first
        residual: torch.Tensor | None = None,  # [T, out] added to the product
    ) -> torch.Tensor:
        if self.kernel is not None:
            key = id(weight)
            return self.kernel.linear(
                x, weight, self.widths[key], norm, self.eps, residual, self.scales.get(key)
            )
        if norm is not None:
            x = rms_norm(x, norm, self.eps)
        out = F.linear(x, weight)
        return out if residual is None else residual + out


def fold_sin(sin: torch.Tensor) -> torch.Tensor:
    """Llama RoPE ``x * cos + rotate_half(x) * sin`` equals ``x * cos + roll(x, d/2) * folded``
    with the first half of sin negated: one roll instead of a slice, a negation and a cat."""
    sign = torch.ones(sin.shape[-1], dtype=sin.dtype, device=sin.device)
    sign[: sin.shape[-1] // 2] = -1
    return sin * sign


def rope_tables(head_dim: int, theta: float, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, folded sin) [positions, head_dim] of the drafters' ``apply_rope`` (Llama layout,
    ``models/eagle3/model.py``), the sin folded for ``grouped_attention``'s roll form."""
    arange = torch.arange(0, head_dim, 2, dtype=torch.float32)
    inv_freq = 1.0 / (theta ** (arange / head_dim))
    angles = torch.arange(positions, dtype=torch.float32)[:, None] * inv_freq  # [P, dim/2]
    emb = torch.cat([angles, angles], dim=-1)  # [P, dim]
    return emb.cos(), fold_sin(emb.sin())


def causal_mask(
    start: int, steps: int, *, group: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor | None:
    """Additive [group * T, start + T] causal mask for T new tokens after ``start`` cached ones,
    repeated for the query heads folded into one KV head (None for one token: it sees all)."""
    if steps == 1:
        return None
    keys = torch.arange(start + steps, device=device)  # [S]
    queries = torch.arange(start, start + steps, device=device)  # [T]
    mask = torch.zeros((steps, start + steps), dtype=dtype, device=device)
    mask.masked_fill_(keys[None, :] > queries[:, None], float("-inf"))
    return mask.repeat(group, 1)


def visibility_mask(
    sees: torch.Tensor, *, group: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Additive ``[group * T, S]`` mask from a ``[T, S]`` bool "entry t attends to key s" (a
    draft tree's), repeated for the query heads folded into one KV head like ``causal_mask``."""
    mask = torch.zeros(sees.shape, dtype=dtype, device=device)
    mask.masked_fill_(~sees.to(device), float("-inf"))
    return mask.repeat(group, 1)


def grouped_attention(
    qkv: torch.Tensor,  # [T, (heads + 2 * kv_heads) * dim]: the fused q/k/v projection
    keys: torch.Tensor,  # [kv_heads, capacity, dim]: this layer's cache, written at start..
    values: torch.Tensor,  # [kv_heads, capacity, dim]
    *,
    start: int,
    heads: int,
    cos: torch.Tensor,  # [T, 1, dim]
    folded_sin: torch.Tensor,  # [T, 1, dim], from fold_sin
    mask: torch.Tensor | None,  # from causal_mask
) -> torch.Tensor:
    """RoPE on q and k, the new K/V into the cache, then one SDPA call: [T, heads * dim].

    Query head h reads KV head h // group, so each group's query heads are folded into the query
    axis and the cache is never repeated; 4-D inputs take SDPA's fused CPU kernel."""
    kv_heads, dim = keys.shape[0], keys.shape[2]
    steps, group, end = qkv.shape[0], heads // kv_heads, start + qkv.shape[0]
    qk = qkv[:, : (heads + kv_heads) * dim].view(steps, heads + kv_heads, dim)
    qk = qk * cos + qk.roll(dim // 2, dims=-1) * folded_sin
    keys[:, start:end] = qk[:, heads:].transpose(0, 1)
    values[:, start:end] = (
        qkv[:, (heads + kv_heads) * dim :].view(steps, kv_heads, dim).transpose(0, 1)
    )
    q = qk[:, :heads].view(steps, kv_heads, group, dim).permute(1, 2, 0, 3)  # [kv, g, T, dim]
    q = q.reshape(1, kv_heads, group * steps, dim)
    out = F.scaled_dot_product_attention(
        q, keys[None, :, :end], values[None, :, :end], attn_mask=mask, scale=dim**-0.5
    )  # [1, kv_heads, group * T, dim]
    return out.view(kv_heads, group, steps, dim).permute(2, 0, 1, 3).reshape(steps, heads * dim)


class LeanLlama:
    """The Llama forward for one sequence against a ``StaticKVCache``."""

    def __init__(self, model: PreTrainedModel, *, kernel: str = "auto") -> None:
        reason = lean_unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"the lean forward does not support this model: {reason}")
        weight = model.lm_head.weight
        config = model.config
        self.model = model
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.heads)
        self.hidden = int(config.hidden_size)
        self.intermediate = int(config.intermediate_size)
        self.eps = float(config.rms_norm_eps)
        self.linear = PackedLinear(select_kernel(kernel, weight), self.eps)
        self.layers = [self._fuse(layer) for layer in model.model.layers]
        self.embed = model.model.embed_tokens.weight.detach()
        self.final_norm = model.model.norm.weight.detach()
        self.lm_head = self.linear.prepare(weight)
        self._cos = self._sin = torch.empty(0)
        self._rope_table(max(2048, 1))

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def kernel_name(self) -> str:
        """``native-avx512`` / ``native-avx2`` (the small-M GEMM) or ``torch`` (F.linear)."""
        kernel = self.linear.kernel
        return "torch" if kernel is None else f"native-{kernel.isa()}"

    def _fuse(self, layer: Any) -> _Layer:  # a Hugging Face LlamaDecoderLayer
        attn, mlp = layer.self_attn, layer.mlp
        qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
        prepare = self.linear.prepare
        return _Layer(
            input_norm=layer.input_layernorm.weight.detach(),
            qkv=prepare(qkv),
            o=prepare(attn.o_proj.weight),
            post_norm=layer.post_attention_layernorm.weight.detach(),
            gate_up=prepare(gate_up),
            down=prepare(mlp.down_proj.weight),
        )

    def _rope_table(self, positions: int) -> None:
        """cos and sign-folded sin for positions [0, positions), from the model's rotary module
        (so every RoPE variant it implements gives the same values here)."""
        rotary = self.model.model.rotary_emb
        position_ids = torch.arange(positions, device=self.device)[None]  # [1, P]
        probe = self.embed[:1][None]  # [1, 1, hidden]: only its dtype and device are read
        cos, sin = rotary(probe, position_ids)  # [1, P, head_dim] each
        self._cos, self._sin = cos[0], fold_sin(sin[0])  # [P, head_dim]

    @property
    def rope_positions(self) -> int:
        return int(self._cos.shape[0])

    def extend_rope(self, positions: int) -> None:
        """Make the RoPE table cover positions [0, positions) (at least doubling it)."""
        if positions > self.rope_positions:
            self._rope_table(max(positions, 2 * self.rope_positions))

    def rope_rows(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and folded sin ``[B, 1, head_dim]`` at one position per row."""
        return self._cos[positions][:, None], self._sin[positions][:, None]

    def new_cache(self, capacity: int = 1024) -> StaticKVCache:
        return StaticKVCache(
            layers=len(self.layers),
            kv_heads=self.kv_heads,
            head_dim=self.head_dim,
            capacity=capacity,
            dtype=self.embed.dtype,
            device=self.device,
        )

    @torch.inference_mode()
    def forward(
        self,
        ids: torch.Tensor,  # [T]
        cache: StaticKVCache,
        *,
        feature_layers: tuple[int, ...] = (),
        last_logits_only: bool = False,
        final_hidden: bool = False,
        tree: TreeLayout | None = None,
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Logits ``[T or 1, vocab]`` and the outputs ``[T, hidden]`` of ``feature_layers``
        (with ``final_hidden``, also the final-norm output the LM head reads, under key -1).
        With ``tree`` the T tokens are a draft tree (``speculative/tree.py``): each at the
        position of its depth, seeing the prefix and its ancestors only."""
        steps, start = int(ids.shape[0]), cache.length
        end = start + steps
        cache.reserve(end)
        self.extend_rope(end)
        group = self.heads // self.kv_heads
        dtype = self.embed.dtype
        if tree is None:
            cos = self._cos[start:end, None]  # [T, 1, head_dim]
            sin = self._sin[start:end, None]
            mask = causal_mask(start, steps, group=group, dtype=dtype, device=self.device)
        else:
            positions = tree.positions(start).to(self.device)
            cos, sin = self._cos[positions, None], self._sin[positions, None]
            sees = tree.visibility(start)
            mask = visibility_mask(sees, group=group, dtype=dtype, device=self.device)
        x = F.embedding(ids, self.embed)  # [T, hidden]
        features: dict[int, torch.Tensor] = {}
        linear = self.linear
        for index, layer in enumerate(self.layers):
            x = self._attention(index, layer, x, cache, cos=cos, sin=sin, mask=mask)
            gate_up = linear(x, layer.gate_up, norm=layer.post_norm)  # [T, 2 * intermediate]
            act = F.silu(gate_up[:, : self.intermediate]) * gate_up[:, self.intermediate :]
            x = linear(act, layer.down, residual=x)
            if index in feature_layers:
                features[index] = x
        cache.length = end
        last_layer = len(self.layers) - 1
        if last_layer in features or final_hidden:  # Hugging Face reports the last layer
            normed = rms_norm(x, self.final_norm, self.eps)  # after the final norm
            if last_layer in features:
                features[last_layer] = normed
            if final_hidden:
                features[-1] = normed
        last = x[-1:] if last_logits_only else x
        return linear(last, self.lm_head, norm=self.final_norm), features

    def _attention(
        self,
        index: int,
        layer: _Layer,
        x: torch.Tensor,  # [T, hidden]
        cache: StaticKVCache,
        *,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        qkv = self.linear(x, layer.qkv, norm=layer.input_norm)  # [T, (heads + 2 * kv) * dim]
        out = grouped_attention(
            qkv, cache.k[index], cache.v[index], start=cache.length, heads=self.heads,
            cos=cos, folded_sin=sin, mask=mask,
        )  # fmt: skip
        return self.linear(out, layer.o, residual=x)
