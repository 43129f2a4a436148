"""Target-feature cache: what a shard gives back equals an on-the-fly target pass, resume writes
only what is missing, a mismatched cache is refused, and SFT on the cache equals SFT without it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from draftopd.models.target import TargetModel
from draftopd.training.data.batches import collate, target_features
from draftopd.training.data.features import (
    CACHE_DTYPES,
    FeatureCache,
    build_feature_cache,
    lm_head_weight,
)
from draftopd.training.data.regenerate import Sample
from draftopd.training.sft.train import train_sft
from tests.unit.training.helpers import tiny_sft

# bf16 keeps 8 significant bits, fp16 11: relative error 2^-8 and 2^-11 of each stored value
STORAGE_RTOL = {"float32": 0.0, "bfloat16": 2**-8, "float16": 2**-11}


def _on_the_fly(
    target: TargetModel, samples: list[Sample], max_seq_len: int, d2t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch = collate(samples, pad_id=0, max_length=max_seq_len)
    features, logits = target_features(target, batch.input_ids, batch.attention_mask)
    return features, logits.index_select(-1, d2t), batch.attention_mask.bool()


@pytest.mark.parametrize("dtype", list(CACHE_DTYPES))
def test_a_shard_reads_back_what_the_target_computes(
    sharp_target: TargetModel,
    corpus: tuple[list[Sample], list[list[int]]],
    tmp_path: Path,
    dtype: str,
) -> None:
    samples = corpus[0][:20]
    stats = build_feature_cache(
        sharp_target, samples, tmp_path, dtype=dtype, max_seq_len=40, batch_size=3, shard_size=8,
        progress=False,
    )  # fmt: skip
    assert (stats.samples, stats.shards) == (20, 3)
    assert stats.bytes_per_token == 4 * sharp_target.hidden_size * CACHE_DTYPES[dtype].itemsize
    cache = FeatureCache(tmp_path, samples, sharp_target)
    d2t = torch.tensor([5, 1, 40, 7, 99, 3])
    head = lm_head_weight(sharp_target).detach()[d2t].float()
    picked = [17, 2, 9, 2]  # across shards, repeated, any order
    features, logits = cache.batch(picked, max_seq_len=40, head=head)
    want_f, want_l, valid = _on_the_fly(sharp_target, [samples[i] for i in picked], 40, d2t)
    assert features.shape == want_f.shape and logits.shape == want_l.shape
    if dtype == "float32":
        torch.testing.assert_close(features[valid], want_f[valid], rtol=0, atol=1e-5)
        torch.testing.assert_close(logits[valid], want_l[valid], rtol=0, atol=1e-5)
    else:
        rtol = STORAGE_RTOL[dtype]
        bound = rtol * want_f[valid].abs() + 1e-5
        assert bool(((features[valid] - want_f[valid]).abs() <= bound).all())
        # logits are a dot product of H stored values: their error is bounded by rtol * sum|h w|
        hidden_bound = rtol * (want_l[valid].abs().max() + 1)
        assert float((logits[valid] - want_l[valid]).abs().max()) <= float(hidden_bound) * 8
    assert not bool(features[~valid].any())  # padding is zeros


def test_a_rerun_writes_only_the_missing_shards_and_refuses_other_settings(
    sharp_target: TargetModel, corpus: tuple[list[Sample], list[list[int]]], tmp_path: Path
) -> None:
    samples = corpus[0][:20]
    args = {"dtype": "float32", "max_seq_len": 40, "shard_size": 8, "progress": False}
    build_feature_cache(sharp_target, samples, tmp_path, **args)  # type: ignore[arg-type]
    first = (tmp_path / "features-0000000.safetensors").read_bytes()
    (tmp_path / "features-0000008.safetensors").unlink()  # as if interrupted
    (tmp_path / "features-0000008.safetensors.123.tmp").write_bytes(b"partial")
    stats = build_feature_cache(sharp_target, samples, tmp_path, **args)  # type: ignore[arg-type]
    assert (stats.samples, stats.shards) == (8, 1)
    assert (tmp_path / "features-0000000.safetensors").read_bytes() == first
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="max_seq_len"):
        build_feature_cache(sharp_target, samples, tmp_path, **{**args, "max_seq_len": 30})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="different data"):
        FeatureCache(tmp_path, [*samples[:19], samples[0]], sharp_target)
    with pytest.raises(ValueError, match="max_seq_len 64"):
        FeatureCache(tmp_path, samples, sharp_target).batch(
            [0], max_seq_len=64, head=torch.zeros(3, sharp_target.hidden_size)
        )
    with pytest.raises(ValueError, match="cache dtype"):
        build_feature_cache(sharp_target, samples, tmp_path / "x", dtype="int8", max_seq_len=40)


def test_sft_on_the_cache_trains_like_sft_on_the_fly(
    sharp_target: TargetModel, corpus: tuple[list[Sample], list[list[int]]], tmp_path: Path
) -> None:
    samples = corpus[0][:40]
    cfg = tiny_sft(total_steps=6, max_seq_len=48)
    fly = train_sft(sharp_target, samples, tmp_path / "fly", cfg, progress=False)
    build_feature_cache(
        sharp_target, samples, tmp_path / "cache", dtype="float32", max_seq_len=48, progress=False
    )
    cached = train_sft(
        sharp_target, samples, tmp_path / "run", cfg, progress=False, features=tmp_path / "cache"
    )
    for a, b in zip(fly.history[1:], cached.history[1:], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    for (name, p), q in zip(
        fly.drafter.named_parameters(), cached.drafter.parameters(), strict=True
    ):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4, msg=name)
