"""The lean DFlash block pass against the drafter module (the reference): context extension and
one block per cycle, in float32, bfloat16 and int8, with the target's mask token and with a
learned mask; and the proposals a decoding run makes."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from draftopd.models.checkpoint import random_drafter_for
from draftopd.speculative.engine import DecodeEngine
from draftopd.speculative.sampling import SamplingParams


def _module_blocks(drafter: Any, feats: torch.Tensor, ids: list[int], cuts: list[int]) -> Any:
    """The block logits [B-1, Vd] drafted at each anchor ``cut`` with the context before it."""
    out = []
    for cut in cuts:
        context = drafter.context(feats[None, :cut])
        logits = drafter.blocks(context, torch.tensor([[ids[cut]]]), torch.tensor([[cut]]),
                                all_context=True)  # fmt: skip
        out.append(logits[0, 0])
    return torch.stack(out)


def _lean_blocks(lean: Any, feats: torch.Tensor, ids: list[int], cuts: list[int]) -> Any:
    cache, out = lean.new_cache(capacity=4), []  # grows on the way
    for cut in cuts:
        lean.extend(feats[cache.length : cut], cache)  # the verified positions, in pieces
        out.append(lean.propose(ids[cut], lean.cfg.block_size - 1, cache))
    return torch.stack(out)


@pytest.mark.parametrize(
    ("weights", "tol"), [("float32", 1e-4), ("bfloat16", 3e-2), ("int8", 6e-2)]
)
@pytest.mark.parametrize("mask_token", [None, 5])
def test_lean_blocks_match_the_module(
    tiny_target: Any, weights: str, tol: float, mask_token: int | None
) -> None:
    drafter = random_drafter_for(
        tiny_target, seed=2, architecture="dflash", draft_vocab_size=tiny_target.vocab_size - 20,
        num_layers=2, mask_token_id=mask_token,
    )  # fmt: skip
    if mask_token is None:
        with torch.no_grad():
            drafter.mask_embedding.normal_(0, 0.02)
    generator = torch.Generator().manual_seed(0)
    width = drafter.fc.weight.shape[1]
    feats = torch.randn(40, width, generator=generator)
    ids = torch.randint(0, tiny_target.vocab_size, (40,), generator=generator).tolist()
    cuts = [7, 8, 12, 13, 20, 31]
    lean = drafter.lean_step(weights)
    assert lean is not None and lean.weights == weights
    with torch.inference_mode():
        want = _module_blocks(drafter, feats, ids, cuts)
        got = _lean_blocks(lean, feats, ids, cuts)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_float32_lean_decoding_drafts_what_the_module_drafts(
    tiny_target: Any, tiny_dflash: Any
) -> None:
    """A whole greedy run: the same output (always) and the same cycles (float32 drafts)."""
    engine, params = DecodeEngine(tiny_target), SamplingParams(max_new_tokens=40)
    prompt = list(range(20, 50))
    runs = {}
    for weights in ("module", "float32"):
        proposer = tiny_dflash.proposer(weights=weights)
        assert (proposer.lean is None) == (weights == "module")
        result = engine.generate(prompt, params, proposer=proposer, num_draft_tokens=7)
        runs[weights] = (result.token_ids, result.stats.accepted_by_position, result.stats.cycles)
    assert runs["module"] == runs["float32"]
    plain = engine.generate(prompt, params).token_ids
    assert runs["float32"][0] == plain


def test_packed_weights_follow_parameter_updates(tiny_dflash: Any) -> None:
    first = tiny_dflash.lean_step("float32")
    assert tiny_dflash.lean_step("float32") is first
    with torch.no_grad():
        tiny_dflash.lm_head.weight.mul_(1.0)  # an in-place update bumps the version
    assert tiny_dflash.lean_step("float32") is not first
    with pytest.raises(ValueError, match="draft weights"):
        tiny_dflash.proposer(weights="int4")
