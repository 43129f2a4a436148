"""The lean EAGLE-3 decode forward against the drafter module (the reference)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from draftopd.models.eagle3.model import DrafterCache
from draftopd.speculative.sampling import SamplingParams


def _module_steps(drafter: Any, feats: torch.Tensor, ids: list[int], chain: list[int]) -> Any:
    """Prefill (features + ids), then one step per chain token feeding back the hidden state."""
    cache = DrafterCache()
    n = len(ids)
    out = drafter(drafter.project(feats[None]), torch.tensor([ids]), torch.arange(n)[None],
                  cache=cache)  # fmt: skip
    logits, hiddens = [out.logits[0, -1]], [out.hidden[0]]
    for i, token in enumerate(chain):
        out = drafter(out.hidden[:, -1:], torch.tensor([[token]]), torch.tensor([[n + i]]),
                      cache=cache)  # fmt: skip
        logits.append(out.logits[0, -1])
        hiddens.append(out.hidden[0])
    return torch.stack(logits), torch.cat(hiddens)


def _lean_steps(lean: Any, feats: torch.Tensor, ids: list[int], chain: list[int]) -> Any:
    cache = lean.new_cache(capacity=4)  # grows on the way
    logits, hidden = lean.forward(lean.project(feats), torch.tensor(ids), cache)
    all_logits, hiddens = [logits], [hidden]
    for token in chain:
        logits, hidden = lean.forward(hidden[-1:], torch.tensor([token]), cache)
        all_logits.append(logits)
        hiddens.append(hidden)
    return torch.stack(all_logits), torch.cat(hiddens)


@pytest.mark.parametrize(
    ("weights", "tol"), [("float32", 1e-4), ("bfloat16", 3e-2), ("int8", 5e-2)]
)
def test_lean_forward_matches_the_module(tiny_drafter: Any, weights: str, tol: float) -> None:
    generator = torch.Generator().manual_seed(0)
    hidden = tiny_drafter.cfg.hidden_size
    feats = torch.randn(9, 3 * hidden, generator=generator)
    ids = torch.randint(0, tiny_drafter.cfg.target_vocab_size, (9,), generator=generator).tolist()
    chain = [3, 17, 40, 41, 5]
    lean = tiny_drafter.lean_step(weights)
    assert lean is not None and lean.weights == weights
    with torch.inference_mode():
        want = _module_steps(tiny_drafter, feats, ids, chain)
        got = _lean_steps(lean, feats, ids, chain)
    torch.testing.assert_close(got[0], want[0], rtol=tol, atol=tol)
    torch.testing.assert_close(got[1], want[1], rtol=tol, atol=tol)


def test_float32_lean_proposals_equal_the_module(tiny_target: Any, tiny_drafter: Any) -> None:
    params = SamplingParams(max_new_tokens=8)
    prompt = list(range(20, 50))
    cache = tiny_target.new_decode_cache()
    out = tiny_target.forward(torch.tensor([prompt[:-1]]), cache, want_features=True)
    proposals = {}
    for weights in ("module", "float32"):
        proposer = tiny_drafter.proposer(weights=weights)
        assert (proposer.lean is None) == (weights == "module")
        proposer.start(prompt, out.features[0])
        first = proposer.propose(prompt, 4, params, None).tokens
        proposer.commit([first[0]], out.features[0, -1:])
        proposals[weights] = (first, proposer.propose([*prompt, first[0]], 3, params, None).tokens)
    assert proposals["module"] == proposals["float32"]


def test_packed_weights_follow_parameter_updates(tiny_target: Any) -> None:
    from draftopd.models.checkpoint import random_drafter_for

    drafter = random_drafter_for(tiny_target, seed=3)
    first = drafter.lean_step("float32")
    assert drafter.lean_step("float32") is first  # cached while the weights are unchanged
    with torch.no_grad():
        drafter.lm_head.weight.mul_(2.0)  # what an optimizer step does: an in-place update
    second = drafter.lean_step("float32")
    assert second is not first
    with pytest.raises(ValueError, match="draft weights"):
        drafter.lean_step("int4")
