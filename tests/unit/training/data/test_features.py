"""Target-feature cache: what a shard gives back equals an on-the-fly target pass (whether greedy
regeneration captured it or a separate pass built it), only missing or stale shards are encoded,
a mismatched cache is refused, and SFT on the cache trains like SFT on the fly and resumes
bit-exactly."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from draftopd.models.target import TargetModel
from draftopd.training.data.batches import collate, target_features
from draftopd.training.data.features import (
    CACHE_DTYPES,
    FeatureCache,
    FeatureSpec,
    build_feature_cache,
    lm_head_weight,
)
from draftopd.training.data.regenerate import iter_samples, regenerate
from draftopd.training.sft.train import autocast_on, native_bf16, train_sft
from tests.unit.training.data.test_regenerate import make_prompts
from tests.unit.training.helpers import tiny_sft

MAX_SEQ = 40
# bf16 keeps 8 significant bits, fp16 11: each stored value is within this relative error
STORAGE_RTOL = {"float32": 0.0, "bfloat16": 2**-8, "float16": 2**-11}


@pytest.fixture(scope="module")
def data_dir(tiny_target: TargetModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data")
    regenerate(
        tiny_target, make_prompts(20), out, max_new_tokens=24, batch_size=4, shard_size=8,
        progress=False, engine="generate",
    )  # fmt: skip
    return out


def _read_back(
    target: TargetModel, cache_dir: Path, data: Path, picked: list[int], d2t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cached features, cached logits, on-the-fly features, on-the-fly logits, valid mask)."""
    samples = [list(iter_samples(data))[i] for i in picked]
    head = lm_head_weight(target).detach()[d2t].float()
    features, logits = FeatureCache(cache_dir, data, target).batch(
        samples, max_seq_len=MAX_SEQ, head=head
    )
    batch = collate(samples, pad_id=0, max_length=MAX_SEQ)
    want_f, want_l = target_features(target, batch.input_ids, batch.attention_mask)
    return features, logits, want_f, want_l.index_select(-1, d2t), batch.attention_mask.bool()


@pytest.mark.parametrize("dtype", list(CACHE_DTYPES))
def test_a_built_shard_reads_back_what_the_target_computes(
    tiny_target: TargetModel, data_dir: Path, tmp_path: Path, dtype: str
) -> None:
    spec = FeatureSpec(tmp_path, dtype, MAX_SEQ)
    stats = build_feature_cache(tiny_target, data_dir, spec, batch_size=3, progress=False)
    assert (stats.samples, stats.shards) == (20, 3)
    assert stats.bytes_per_token == 4 * tiny_target.hidden_size * CACHE_DTYPES[dtype].itemsize
    d2t = torch.tensor([5, 1, 40, 7, 99, 3])
    got_f, got_l, want_f, want_l, valid = _read_back(
        tiny_target, tmp_path, data_dir, [17, 2, 9, 2], d2t
    )
    assert got_f.shape == want_f.shape and got_l.shape == want_l.shape
    assert not bool(got_f[~valid].any())  # padding is zeros
    if dtype == "float32":
        torch.testing.assert_close(got_f[valid], want_f[valid], rtol=0, atol=1e-5)
        torch.testing.assert_close(got_l[valid], want_l[valid], rtol=0, atol=1e-5)
        return
    # each stored value is within rtol of the truth; a logit sums H such products, so its error
    # is at most rtol * sum_k |h_k w_k| (plus fp32 noise)
    rtol = STORAGE_RTOL[dtype]
    assert bool(((got_f[valid] - want_f[valid]).abs() <= rtol * want_f[valid].abs() + 1e-5).all())
    samples = [list(iter_samples(data_dir))[i] for i in [17, 2, 9, 2]]
    batch = collate(samples, pad_id=0, max_length=MAX_SEQ)
    with torch.no_grad():
        out = tiny_target.model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask,
            output_hidden_states=True,
        )  # fmt: skip
    hidden = out.hidden_states[-1][valid]  # [n, H]
    head = lm_head_weight(tiny_target).detach()[d2t]
    bound = rtol * (hidden.abs() @ head.abs().T) + 1e-5  # [n, Vd]
    assert bool(((got_l[valid] - want_l[valid]).abs() <= bound).all())


def test_greedy_regeneration_captures_the_features_as_it_decodes(
    tiny_target: TargetModel, tmp_path: Path
) -> None:
    spec = FeatureSpec(tmp_path / "features", "float32", MAX_SEQ)
    data = tmp_path / "data"
    regenerate(
        tiny_target, make_prompts(12), data, max_new_tokens=24, batch_size=5, shard_size=8,
        progress=False, engine="lean", features=spec,
    )  # fmt: skip
    assert sorted(p.name for p in spec.out_dir.glob("*.safetensors")) == [
        "shard-00000.safetensors",
        "shard-00001.safetensors",
    ]
    again = build_feature_cache(tiny_target, data, spec, progress=False)
    assert again.shards == 0  # nothing left to encode
    d2t = torch.arange(tiny_target.vocab_size)
    got_f, got_l, want_f, want_l, valid = _read_back(
        tiny_target, spec.out_dir, data, list(range(12)), d2t
    )
    # the decode steps computed them: equal to one full forward up to reassociation
    torch.testing.assert_close(got_f[valid], want_f[valid], rtol=0, atol=1e-5)
    torch.testing.assert_close(got_l[valid], want_l[valid], rtol=0, atol=1e-5)


def test_only_missing_or_stale_shards_are_encoded_and_mismatches_are_refused(
    tiny_target: TargetModel, data_dir: Path, tmp_path: Path
) -> None:
    spec = FeatureSpec(tmp_path / "cache", "float32", MAX_SEQ)
    build_feature_cache(tiny_target, data_dir, spec, progress=False)
    first = (spec.out_dir / "shard-00000.safetensors").read_bytes()
    (spec.out_dir / "shard-00001.safetensors").unlink()  # as if interrupted
    (spec.out_dir / "shard-00001.safetensors.123.tmp").write_bytes(b"partial")
    stats = build_feature_cache(tiny_target, data_dir, spec, progress=False)
    assert (stats.samples, stats.shards) == (8, 1)
    assert (spec.out_dir / "shard-00000.safetensors").read_bytes() == first
    assert not list(spec.out_dir.glob("*.tmp"))

    # a data shard whose samples changed makes its feature shard stale
    data = tmp_path / "data"
    data.mkdir()
    for path in data_dir.iterdir():
        (data / path.name).write_bytes(path.read_bytes())
    lines = (data / "shard-00002.jsonl").read_text().splitlines()
    record = json.loads(lines[0])
    record["response_ids"] = record["response_ids"][:-1]
    (data / "shard-00002.jsonl").write_text("\n".join([json.dumps(record), *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match="no current shard for shard-00002"):
        FeatureCache(spec.out_dir, data, tiny_target)
    assert build_feature_cache(tiny_target, data, spec, progress=False).shards == 1

    with pytest.raises(ValueError, match="max_seq_len"):
        build_feature_cache(tiny_target, data_dir, replace(spec, max_seq_len=30), progress=False)
    with pytest.raises(ValueError, match="max_seq_len 64"):
        FeatureCache(spec.out_dir, data, tiny_target).batch(
            list(iter_samples(data))[:1], max_seq_len=64, head=torch.zeros(3, 1)
        )
    with pytest.raises(ValueError, match="cache dtype"):
        FeatureSpec(tmp_path / "x", "int8")


def _fly_and_cached(
    target: TargetModel, data_dir: Path, tmp_path: Path, cfg: Any
) -> tuple[Any, Any, FeatureSpec]:
    """SFT with the target on the fly and SFT on an fp32 cache of the same data; their losses
    agree step by step."""
    fly = train_sft(target, data_dir, tmp_path / "fly", cfg, progress=False)
    spec = FeatureSpec(tmp_path / "cache", "float32", MAX_SEQ)
    build_feature_cache(target, data_dir, spec, progress=False)
    cached = train_sft(
        target, data_dir, tmp_path / "run", cfg, progress=False, features=spec.out_dir
    )
    for a, b in zip(fly.history[1:], cached.history[1:], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    return fly, cached, spec


def test_sft_on_the_cache_trains_like_sft_on_the_fly_and_resumes_exactly(
    tiny_target: TargetModel, data_dir: Path, tmp_path: Path
) -> None:
    cfg = tiny_sft(total_steps=6, max_seq_len=MAX_SEQ, batch_size=4, draft_vocab_size=64)
    fly, cached, spec = _fly_and_cached(tiny_target, data_dir, tmp_path, cfg)
    for (name, p), q in zip(
        fly.drafter.named_parameters(), cached.drafter.parameters(), strict=True
    ):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4, msg=name)

    # interrupted after its step-3 checkpoint and resumed: bit-identical to the straight run
    stepped = replace(cfg, checkpoint_every=3)
    straight = train_sft(
        tiny_target, data_dir, tmp_path / "a", stepped, progress=False, features=spec.out_dir
    )

    class Killed(Exception):
        pass

    def stop(line: dict[str, object]) -> None:
        if line["step"] == 4:
            raise Killed

    with pytest.raises(Killed):
        train_sft(
            tiny_target, data_dir, tmp_path / "b", stepped, progress=False,
            features=spec.out_dir, on_step=stop,
        )  # fmt: skip
    resumed = train_sft(
        tiny_target, data_dir, tmp_path / "b", stepped, progress=False, features=spec.out_dir
    )
    assert resumed.resumed_from == 3
    for p, q in zip(straight.drafter.parameters(), resumed.drafter.parameters(), strict=True):
        assert torch.equal(p, q)


def test_bf16_autocast_trains_close_to_float32(
    tiny_target: TargetModel, data_dir: Path, tmp_path: Path
) -> None:
    """Autocast changes the drafter's matmul precision only: the loss curve stays close, and
    the weights (and optimizer) stay float32."""
    spec = FeatureSpec(tmp_path / "cache", "float32", MAX_SEQ)
    build_feature_cache(tiny_target, data_dir, spec, progress=False)
    cfg = tiny_sft(total_steps=6, max_seq_len=MAX_SEQ, batch_size=4, draft_vocab_size=64)
    runs = {}
    for mode in ("off", "bfloat16"):
        runs[mode] = train_sft(
            tiny_target, data_dir, tmp_path / mode, replace(cfg, autocast=mode), progress=False,
            features=spec.out_dir,
        )  # fmt: skip
    for a, b in zip(runs["off"].history[1:], runs["bfloat16"].history[1:], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=0.05)
    assert all(p.dtype == torch.float32 for p in runs["bfloat16"].drafter.parameters())


def test_autocast_auto_trains_as_the_mode_this_device_resolves_to(
    tiny_target: TargetModel, data_dir: Path, tmp_path: Path
) -> None:
    """auto is bfloat16 where the CPU multiplies bf16 natively and off elsewhere: the run equals
    the resolved mode's run step for step, and differs from the other mode's."""
    spec = FeatureSpec(tmp_path / "cache", "float32", MAX_SEQ)
    build_feature_cache(tiny_target, data_dir, spec, progress=False)
    cfg = tiny_sft(total_steps=3, max_seq_len=MAX_SEQ, batch_size=4, draft_vocab_size=64)
    resolved = "bfloat16" if native_bf16(tiny_target.device) else "off"
    other = "off" if resolved == "bfloat16" else "bfloat16"
    losses = {}
    for mode in ("auto", resolved, other):
        run = train_sft(
            tiny_target, data_dir, tmp_path / mode, replace(cfg, autocast=mode), progress=False,
            features=spec.out_dir,
        )  # fmt: skip
        losses[mode] = [line["loss"] for line in run.history[1:]]
    assert losses["auto"] == losses[resolved]
    assert losses["auto"] != losses[other]
    assert autocast_on("auto", torch.device("meta")) is False


def test_block_sft_reads_the_cache_too(
    tiny_target: TargetModel, data_dir: Path, tmp_path: Path
) -> None:
    """The DFlash family's SFT takes the cache's draft-vocab logits like EAGLE-3's."""
    cfg = tiny_sft(
        total_steps=4, max_seq_len=MAX_SEQ, batch_size=4, draft_vocab_size=64,
        drafter_type="dflash", block_size=4,
    )  # fmt: skip
    _fly_and_cached(tiny_target, data_dir, tmp_path, cfg)
