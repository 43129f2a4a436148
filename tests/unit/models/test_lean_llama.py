"""The lean Llama step against Hugging Face's forward (the reference): logits, features, cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from draftopd.models.lean_llama import LeanLlama, StaticKVCache, lean_unsupported_reason
from draftopd.models.target import TargetModel, crop_cache, load_target
from draftopd.speculative.engine import DecodeEngine
from draftopd.speculative.proposers import NgramProposer
from draftopd.speculative.sampling import SamplingParams

KERNELS = ["torch", "native"]


def _reference(target: TargetModel, ids: torch.Tensor) -> Any:
    with torch.inference_mode():
        return target.model(input_ids=ids[None], output_hidden_states=True)


@pytest.mark.parametrize("kernel", KERNELS)
def test_chunked_steps_with_crops_match_one_hf_forward(tiny_target: Any, kernel: str) -> None:
    """Prefill, 1-token steps, a verification block cropped after a 'rejection', a capacity
    overflow: every kept position's logits and features match one full HF forward."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, tiny_target.vocab_size, (60,), generator=generator)
    lean = LeanLlama(tiny_target.model, kernel=kernel)
    cache = lean.new_cache(capacity=16)  # grows twice below
    layers = tiny_target.feature_layers
    pieces, feats = [], []
    for start, end, keep in [(0, 10, 10), (10, 11, 11), (11, 16, 13), (13, 14, 14), (14, 60, 60)]:
        logits, hidden = lean.forward(ids[start:end], cache, feature_layers=layers)
        pieces.append(logits[: keep - start])
        feats.append(torch.cat([hidden[i] for i in layers], dim=-1)[: keep - start])
        cache.crop(keep)
        assert cache.length == keep
    assert cache.capacity >= 60
    ref = _reference(tiny_target, ids)
    torch.testing.assert_close(torch.cat(pieces), ref.logits[0], rtol=1e-4, atol=1e-4)
    ref_feats = torch.cat([ref.hidden_states[i + 1][0] for i in layers], dim=-1)
    torch.testing.assert_close(torch.cat(feats), ref_feats, rtol=1e-4, atol=1e-4)


def test_last_logits_only_and_the_target_wrapper(tiny_target: Any) -> None:
    ids = torch.arange(3, 23)[None]  # [1, 20]
    cache = tiny_target.new_decode_cache("lean")
    assert isinstance(cache, StaticKVCache)
    out = tiny_target.forward(ids, cache, want_features=True, last_logits_only=True)
    ref = _reference(tiny_target, ids[0])
    assert out.logits.shape == (1, 1, tiny_target.vocab_size)
    torch.testing.assert_close(out.logits[0, 0], ref.logits[0, -1], rtol=1e-4, atol=1e-4)
    assert out.features is not None and out.features.shape == (1, 20, 3 * tiny_target.hidden_size)
    crop_cache(cache, 5)
    assert cache.get_seq_length() == 5
    with pytest.raises(ValueError, match="one sequence"):
        tiny_target.forward(torch.zeros((2, 3), dtype=torch.long), tiny_target.new_decode_cache())


@pytest.mark.parametrize("kernel", KERNELS)
def test_greedy_tokens_equal_the_hf_step(tiny_target_dir: Path, kernel: str) -> None:
    lean = load_target(str(tiny_target_dir), step="lean", kernel=kernel)
    hf = load_target(str(tiny_target_dir), step="hf")
    assert isinstance(lean.new_decode_cache(), StaticKVCache)
    assert not isinstance(hf.new_decode_cache(), StaticKVCache)
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    for prompt in ([5, 9, 2, 77], [100], list(range(30, 70))):
        want = DecodeEngine(hf).generate(prompt, params, decode_text=False).token_ids
        for proposer in (None, NgramProposer()):
            got = DecodeEngine(lean).generate(prompt, params, proposer=proposer, decode_text=False)
            assert got.token_ids == want, (kernel, prompt, proposer)


def test_static_cache_crop_and_reserve() -> None:
    cache = StaticKVCache(layers=2, kv_heads=1, head_dim=4, capacity=3, dtype=torch.float32,
                          device=torch.device("cpu"))  # fmt: skip
    cache.k[:, :, :3] = torch.arange(3.0)[None, None, :, None]
    cache.length = 3
    cache.reserve(5)
    assert cache.capacity == 6 and torch.equal(cache.k[1, 0, :3, 0], torch.arange(3.0))
    cache.crop(7)  # cropping past the end keeps everything
    assert cache.length == 3
    cache.crop(1)
    assert cache.length == 1
    with pytest.raises(ValueError, match="negative"):
        cache.crop(-1)


def test_unsupported_models_fall_back_to_hf(tiny_target_dir: Path) -> None:
    target = load_target(str(tiny_target_dir))
    assert target.step == "lean" and lean_unsupported_reason(target.model) is None
    target.model.config.attention_bias = True  # as if the projections had biases
    assert "bias" in str(lean_unsupported_reason(target.model))
    with pytest.raises(ValueError, match="bias"):
        TargetModel(target.model, target.tokenizer, name="x", step="lean")
    fallback = TargetModel(target.model, target.tokenizer, name="x")
    assert fallback.step == "hf" and not isinstance(fallback.new_decode_cache(), StaticKVCache)
    with pytest.raises(ValueError, match="kernel"):
        TargetModel(target.model, target.tokenizer, name="x", kernel="fast")
