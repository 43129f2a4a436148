"""DFlash block drafter: what each block slot may see, and that one batched pass over many
anchors equals drafting each block alone against the context before its anchor."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from draftopd.models.dflash.drafter import DFlashDrafter, random_dflash
from draftopd.models.dflash.model import ContextCache, DFlashConfig, block_attention, block_mask

H, V, B, T = 32, 50, 4, 12


def _config(**changes: object) -> DFlashConfig:
    values: dict[str, object] = {
        "hidden_size": H,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "intermediate_size": 64,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "target_vocab_size": V,
        "draft_vocab_size": 40,
        "feature_layers": (0, 2, 3),
        "num_layers": 2,
        "block_size": B,
    }
    values.update(changes)
    return DFlashConfig(**values)  # type: ignore[arg-type]


def _drafter(**changes: object) -> DFlashDrafter:
    drafter = random_dflash(_config(**changes), seed=0, std=0.2)
    torch.manual_seed(1)
    drafter._embedding = [nn.Embedding(V, H)]
    return drafter.eval()


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(2, T, 3 * H, generator=generator)
    ids = torch.randint(0, V, (2, T), generator=generator)
    return features, ids


def test_block_mask_sees_the_context_before_its_anchor_and_its_own_block() -> None:
    mask = block_mask(torch.tensor([[2, 5]]), context_length=6, block_size=2)[0, 0]
    assert mask.shape == (4, 6 + 4)
    assert mask[:2, :6].tolist() == [[True, True, False, False, False, False]] * 2
    assert mask[2:, :6].tolist() == [[True] * 5 + [False]] * 2
    assert mask[:, 6:].tolist() == [
        [True, True, False, False],
        [True, True, False, False],
        [False, False, True, True],
        [False, False, True, True],
    ]


@pytest.mark.parametrize(("heads", "kv_heads", "block"), [(4, 2, 4), (3, 3, 2), (6, 2, 8)])
def test_block_attention_equals_dense_attention_under_the_block_mask(
    heads: int, kv_heads: int, block: int
) -> None:
    generator = torch.Generator().manual_seed(heads + block)
    anchors = torch.tensor([[0, 7, 3], [11, 11, 1]])  # anchor 0 sees its own block only
    slots, dim = anchors.shape[1] * block, 8
    q = torch.randn(2, heads, slots, dim, generator=generator)
    k, v = (torch.randn(2, kv_heads, slots, dim, generator=generator) for _ in range(2))
    ctx = tuple(torch.randn(2, kv_heads, T, dim, generator=generator) for _ in range(2))
    dense = F.scaled_dot_product_attention(
        q, torch.cat([ctx[0], k], 2), torch.cat([ctx[1], v], 2),
        attn_mask=block_mask(anchors, T, block), enable_gqa=heads != kv_heads,
    )  # fmt: skip
    sparse = block_attention(q, k, v, (ctx[0], ctx[1]), anchors, block)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)
    wrong = block_attention(q, k, v, (ctx[0], ctx[1]), anchors + 1, block)
    assert not torch.allclose(wrong, dense, atol=1e-3)


@pytest.mark.parametrize("mask_token_id", [None, 7])
def test_many_anchors_in_one_pass_equal_each_block_drafted_alone(
    mask_token_id: int | None,
) -> None:
    drafter = _drafter(mask_token_id=mask_token_id)
    features, ids = _inputs()
    anchors = torch.tensor([[1, 4, 9], [11, 3, 6]])  # any order, per row
    anchor_ids = ids.gather(1, anchors)
    with torch.no_grad():
        together = drafter.blocks(drafter.context(features), anchor_ids, anchors)
        assert together.shape == (2, 3, B - 1, 40)
        for row in range(2):
            for c in range(3):
                a = int(anchors[row, c])
                alone = drafter.blocks(
                    drafter.context(features[row : row + 1, :a]),
                    anchor_ids[row : row + 1, c : c + 1],
                    anchors[row : row + 1, c : c + 1],
                    all_context=True,
                )
                torch.testing.assert_close(together[row, c], alone[0, 0], rtol=1e-4, atol=1e-5)


def test_nothing_at_or_after_the_anchor_and_no_other_block_leaks_in() -> None:
    drafter = _drafter()
    features, ids = _inputs()
    anchors = torch.tensor([[5, 8]] * 2)
    with torch.no_grad():
        base = drafter.blocks(drafter.context(features), ids.gather(1, anchors), anchors)
        later = features.clone()
        later[:, 5:] += 3.0  # context at and after the first anchor
        moved = drafter.blocks(drafter.context(later), ids.gather(1, anchors), anchors)
        other = ids.gather(1, anchors)
        other[:, 1] = (other[:, 1] + 1) % V  # the second block's anchor token
        swapped = drafter.blocks(drafter.context(features), other, anchors)
    torch.testing.assert_close(moved[:, 0], base[:, 0])
    assert not torch.allclose(moved[:, 1], base[:, 1])
    torch.testing.assert_close(swapped[:, 0], base[:, 0])
    assert not torch.allclose(swapped[:, 1], base[:, 1])


def test_the_context_cache_extends_piece_by_piece() -> None:
    drafter = _drafter()
    features, _ = _inputs()
    with torch.no_grad():
        whole = drafter.context(features)
        first, second = drafter.context(features[:, :5]), drafter.context(features[:, 5:], 5)
    joined = ContextCache(
        keys=[torch.cat([a, b], 2) for a, b in zip(first.keys, second.keys, strict=True)],
        values=[torch.cat([a, b], 2) for a, b in zip(first.values, second.values, strict=True)],
    )
    assert joined.length == T
    for a, b in zip(joined.keys + joined.values, whole.keys + whole.values, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    joined.crop(7)
    assert joined.length == 7


def test_config_round_trip_and_bad_values() -> None:
    cfg = _config(mask_token_id=3)
    assert DFlashConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["architecture"] == "dflash"
    with pytest.raises(ValueError, match="unknown DFlashConfig fields"):
        DFlashConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="block_size"):
        _config(block_size=1)
    with pytest.raises(ValueError, match="draft_vocab_size"):
        _config(draft_vocab_size=V + 1)
    assert "mask_embedding" not in dict(DFlashDrafter(cfg).named_parameters())
    assert "mask_embedding" in dict(DFlashDrafter(_config()).named_parameters())
