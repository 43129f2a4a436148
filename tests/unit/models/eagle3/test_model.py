"""EAGLE-3 drafter: cache consistency, draft vocabulary maps, safetensors checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from draftopd.models.checkpoint import load_drafter, random_drafter_for, save_drafter
from draftopd.models.eagle3.model import DrafterCache
from draftopd.models.target import TargetModel, load_target
from draftopd.models.tiny import build_tiny_target
from tests.unit.speculative.helpers import small_vocab_target


def test_cached_incremental_forward_equals_full_forward(tiny_drafter: Any) -> None:
    torch.manual_seed(0)
    hidden = torch.randn(1, 9, tiny_drafter.cfg.hidden_size)
    ids = torch.randint(0, 200, (1, 9))
    positions = torch.arange(9)[None]
    full = tiny_drafter(hidden, ids, positions)
    cache = DrafterCache()
    first = tiny_drafter(hidden[:, :5], ids[:, :5], positions[:, :5], cache=cache)
    steps = [
        tiny_drafter(hidden[:, i : i + 1], ids[:, i : i + 1], positions[:, i : i + 1], cache=cache)
        for i in range(5, 9)
    ]
    incremental = torch.cat([first.logits] + [s.logits for s in steps], dim=1)
    torch.testing.assert_close(incremental, full.logits, atol=1e-5, rtol=1e-5)
    cache.crop(5)
    assert cache.length == 5
    again = tiny_drafter(hidden[:, 5:6], ids[:, 5:6], positions[:, 5:6], cache=cache)
    torch.testing.assert_close(again.logits, steps[0].logits)


def test_draft_vocab_maps_are_inverse(tiny_target: TargetModel) -> None:
    drafter = random_drafter_for(tiny_target, seed=1, draft_vocab_size=50)
    chosen = torch.randperm(tiny_target.vocab_size, generator=torch.Generator().manual_seed(0))[:50]
    drafter.set_draft_vocab(chosen)
    assert torch.equal(drafter.t2d[drafter.d2t], torch.arange(50))
    assert int((drafter.t2d >= 0).sum()) == 50
    with pytest.raises(ValueError, match="distinct"):
        drafter.set_draft_vocab(torch.zeros(50, dtype=torch.long))


def test_checkpoint_roundtrip_is_safetensors_and_exact(
    tiny_target: TargetModel, tmp_path: Path
) -> None:
    drafter = random_drafter_for(tiny_target, seed=3, draft_vocab_size=100)
    drafter.set_draft_vocab(torch.arange(tiny_target.vocab_size - 100, tiny_target.vocab_size))
    save_drafter(drafter, tmp_path / "ckpt", provenance={"version": "v7"})
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["config.json", "model.safetensors"]
    meta = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert meta["architecture"] == "eagle3" and meta["provenance"] == {"version": "v7"}
    assert meta["config"]["target_model"] == tiny_target.name
    loaded = load_drafter(tmp_path / "ckpt", tiny_target)
    for (name, a), (_, b) in zip(
        drafter.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert "embed" not in " ".join(drafter.state_dict())  # the target's embedding is shared


def test_incompatible_or_corrupt_checkpoints_are_refused(
    tiny_target: TargetModel, tmp_path: Path
) -> None:
    save_drafter(random_drafter_for(tiny_target, seed=0), tmp_path / "ok")
    other = small_vocab_target(4)
    with pytest.raises(ValueError, match="hidden="):
        load_drafter(tmp_path / "ok", other)

    # the same model under another name (a path instead of an id) is the same target ...
    renamed = TargetModel(tiny_target.model, tiny_target.tokenizer, name="/elsewhere/tiny")
    assert load_drafter(tmp_path / "ok", renamed).cfg.target_fingerprint == tiny_target.fingerprint
    # ... but a target with the same widths and vocabulary and another depth is not
    deeper = load_target(str(build_tiny_target(tmp_path / "deeper", num_layers=5)))
    assert (
        deeper.hidden_size == tiny_target.hidden_size
        and deeper.vocab_size == tiny_target.vocab_size
    )
    with pytest.raises(ValueError, match="built for target"):
        load_drafter(tmp_path / "ok", deeper)

    (tmp_path / "ok" / "model.safetensors").write_bytes(b"\x80\x04garbage-not-safetensors")
    with pytest.raises(ValueError, match="unreadable"):
        load_drafter(tmp_path / "ok", tiny_target)
    with pytest.raises(ValueError, match=r"missing config\.json"):
        load_drafter(tmp_path / "nowhere", tiny_target)
