"""Target-feature cache: one no-grad target pass per sample, so SFT epochs never run the target.

An EAGLE-3 step needs, for every token of a training sequence, the target's fused low/mid/high
features ([3H]) and the target distribution over the draft vocabulary (soft cross-entropy). The
cache stores the features and the target's *final hidden state* ([H], after the final norm): the
distribution over the draft vocabulary is then ``softmax(hidden @ W[d2t].T)``, where W is the
target's LM head. That costs H x Vd multiply-adds per token (4.6M for SmolLM2 with Vd = 8,000),
against the full target forward (about 135M) it replaces, and it leaves the draft vocabulary free
to change after the cache is built. Storing top-k log-probs instead would fix k and the vocab.

Bytes per token: (3H + H) x itemsize, i.e. 4.6 KB in bf16/fp16 and 9.2 KB in fp32 for SmolLM2
(H = 576); prompt tokens are stored too, because the drafter attends over them.

On-disk format (``out_dir``):

- ``features-00000.safetensors``, ...: the samples ``first .. first + count - 1`` of the data (in
  the data's order), their rows concatenated: ``features`` [N, 3H], ``hidden`` [N, H], and
  ``offsets`` [count + 1] (int64; sample i owns rows offsets[i]:offsets[i+1]). Each shard is
  written once, atomically; one that exists is complete.
- ``manifest.json``: format version, target fingerprint and feature layers, dtype, max_seq_len,
  the data fingerprint, and the shard list.

Resume: a rerun with the same settings and data writes only the missing shards; different
settings, target or data raise ``ValueError`` (use a new directory). Sequences longer than
``max_seq_len`` are cut on the right exactly as :func:`collate` cuts them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from draftopd.models.target import TargetModel
from draftopd.training.data.batches import collate, target_pass
from draftopd.training.data.regenerate import Sample

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CACHE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SELF_CHECK_ATOL = 1e-3  # hidden @ W.T must reproduce the model's fp32 logits (reassociation only)


@dataclass(frozen=True)
class CacheStats:
    """What one :func:`build_feature_cache` call did."""

    samples: int  # samples encoded by this call
    tokens: int  # tokens (rows) encoded by this call
    seconds: float  # wall-clock time of the call
    shards: int  # shards written by this call
    bytes_per_token: int  # features + hidden, at the cache's dtype


def data_fingerprint(samples: Sequence[Sample]) -> str:
    """sha256 of the samples' token ids, in order (what the cache was built from)."""
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(json.dumps([sample.prompt_ids, sample.response_ids]).encode())
    return digest.hexdigest()


def lm_head_weight(target: TargetModel) -> torch.Tensor:
    """The target's LM head matrix [V, H]; only a bias-free linear head can be recomputed."""
    head = target.model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        raise ValueError("the feature cache needs a bias-free linear LM head on the target")
    return head.weight


def build_feature_cache(
    target: TargetModel,
    samples: Sequence[Sample],
    out_dir: str | Path,
    *,
    dtype: str = "bfloat16",
    max_seq_len: int,
    batch_size: int = 8,
    shard_size: int = 256,
    progress: bool = True,
) -> CacheStats:
    """Encode every sample not yet cached in ``out_dir`` with one no-grad target pass."""
    if dtype not in CACHE_DTYPES:
        raise ValueError(f"cache dtype {dtype!r} not supported; choose one of {list(CACHE_DTYPES)}")
    if min(max_seq_len, batch_size, shard_size) < 1:
        raise ValueError("max_seq_len, batch_size and shard_size must be positive")
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {
        "target": target.fingerprint,
        "feature_layers": list(target.feature_layers),
        "dtype": dtype,
        "max_seq_len": max_seq_len,
        "shard_size": shard_size,
        "data": data_fingerprint(samples),
        "num_samples": len(samples),
    }
    _check_or_write_manifest(out, settings)
    for stale in out.glob("*.tmp"):
        stale.unlink()  # a partial write of an interrupted run
    head = lm_head_weight(target)
    todo = [i for i in range(0, len(samples), shard_size) if not _shard_path(out, i).is_file()]
    tokens = 0
    bar = tqdm(total=len(samples), desc="feature cache", unit="sample", disable=not progress)
    bar.update(len(samples) - sum(min(shard_size, len(samples) - i) for i in todo))
    try:
        for first in todo:
            group = samples[first : first + shard_size]
            rows = _encode(target, head, group, CACHE_DTYPES[dtype], max_seq_len, batch_size, bar)
            tokens += int(rows["offsets"][-1])
            _atomic_save(rows, _shard_path(out, first), {"first": str(first)})
    finally:
        bar.close()
    itemsize = CACHE_DTYPES[dtype].itemsize
    stats = CacheStats(
        samples=sum(min(shard_size, len(samples) - i) for i in todo),
        tokens=tokens,
        seconds=time.perf_counter() - start,
        shards=len(todo),
        bytes_per_token=4 * target.hidden_size * itemsize,
    )
    logger.info("feature cache %s: %s", out, stats)
    return stats


def _encode(
    target: TargetModel,
    head: torch.Tensor,
    group: Sequence[Sample],
    dtype: torch.dtype,
    max_seq_len: int,
    batch_size: int,
    bar: Any,
) -> dict[str, torch.Tensor]:
    """Features and final hidden states of ``group``, rows concatenated in the group's order."""
    lengths = [min(len(s.prompt_ids) + len(s.response_ids), max_seq_len) for s in group]
    order = sorted(range(len(group)), key=lambda i: lengths[i])  # little padding per batch
    features: list[torch.Tensor] = [torch.empty(0)] * len(group)
    hidden: list[torch.Tensor] = [torch.empty(0)] * len(group)
    for begin in range(0, len(order), batch_size):
        rows = order[begin : begin + batch_size]
        batch = collate([group[i] for i in rows], pad_id=0, max_length=max_seq_len)
        out = target_pass(target, batch.input_ids, batch.attention_mask)
        _self_check(out.logits, out.hidden, head)
        for k, i in enumerate(rows):
            features[i] = out.features[k, : lengths[i]].to(dtype).cpu()
            hidden[i] = out.hidden[k, : lengths[i]].to(dtype).cpu()
        bar.update(len(rows))
    offsets = torch.tensor([0, *lengths], dtype=torch.long).cumsum(0)
    return {
        "features": torch.cat(features).contiguous(),
        "hidden": torch.cat(hidden).contiguous(),
        "offsets": offsets,
    }


def _self_check(logits: torch.Tensor, hidden: torch.Tensor, head: torch.Tensor) -> None:
    """The cached hidden state must give back the model's logits through its LM head."""
    probe = hidden[:, :4].float() @ head.float().T  # [b, 4, V]
    error = float((probe - logits[:, :4].float()).abs().max())
    if error > SELF_CHECK_ATOL:
        raise ValueError(
            f"the target's logits are not its LM head applied to the final hidden state "
            f"(max error {error:.2e}); the feature cache cannot recompute them"
        )


class FeatureCache:
    """A built cache, loaded in memory; :meth:`batch` assembles what one SFT step needs."""

    def __init__(self, out_dir: str | Path, samples: Sequence[Sample], target: TargetModel) -> None:
        out = Path(out_dir)
        manifest = _read_manifest(out)
        if manifest is None:
            raise ValueError(f"{out} has no {MANIFEST}; build it with build_feature_cache()")
        settings = manifest["settings"]
        expected = {
            "target": target.fingerprint,
            "feature_layers": list(target.feature_layers),
            "data": data_fingerprint(samples),
        }
        for key, value in expected.items():
            if settings.get(key) != value:
                raise ValueError(f"feature cache {out} was built for a different {key}")
        self.dtype: str = settings["dtype"]
        self.max_seq_len: int = settings["max_seq_len"]
        self.rows: list[tuple[torch.Tensor, torch.Tensor]] = []
        for first in range(0, len(samples), settings["shard_size"]):
            path = _shard_path(out, first)
            if not path.is_file():
                raise ValueError(f"feature cache {out} is incomplete: {path.name} is missing")
            self.rows.extend(_split(load_file(str(path))))
        if len(self.rows) != len(samples):
            raise ValueError(f"feature cache {out}: {len(self.rows)} samples, not {len(samples)}")

    def batch(
        self, indices: Sequence[int], *, max_seq_len: int, head: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded (features [b, T, 3H], logits [b, T, Vd]) for the samples ``indices``.

        ``head`` is the LM head restricted to the draft vocabulary ([Vd, H], float32): the logits
        are over the draft vocabulary, in d2t order. T matches ``collate(..., max_length)``."""
        if max_seq_len > self.max_seq_len:
            raise ValueError(
                f"the cache keeps {self.max_seq_len} tokens per sequence; "
                f"max_seq_len {max_seq_len} needs a cache built with at least that"
            )
        picked = [self.rows[i] for i in indices]
        width = max(min(f.shape[0], max_seq_len) for f, _ in picked)
        features = torch.zeros(len(picked), width, picked[0][0].shape[1])
        hidden = torch.zeros(len(picked), width, picked[0][1].shape[1])
        for row, (f, h) in enumerate(picked):
            n = min(f.shape[0], max_seq_len)
            features[row, :n] = f[:n].float()
            hidden[row, :n] = h[:n].float()
        with torch.no_grad():
            logits = hidden.to(head.device) @ head.T  # [b, T, Vd]
        return features.to(head.device), logits


def _split(shard: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    offsets = shard["offsets"].tolist()
    return [(shard["features"][a:b], shard["hidden"][a:b]) for a, b in itertools.pairwise(offsets)]


def _shard_path(out: Path, first: int) -> Path:
    return out / f"features-{first:07d}.safetensors"


def _read_manifest(out: Path) -> dict[str, Any] | None:
    path = out / MANIFEST
    if not path.is_file():
        return None
    manifest: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {manifest.get('format_version')!r}")
    return manifest


def _check_or_write_manifest(out: Path, settings: dict[str, Any]) -> None:
    manifest = _read_manifest(out)
    if manifest is not None:
        for key, value in settings.items():
            if manifest["settings"].get(key) != value:
                raise ValueError(
                    f"{out / MANIFEST} was built with a different {key} "
                    f"({manifest['settings'].get(key)!r}, now {value!r}); use a new directory"
                )
        return
    if any(out.glob("features-*.safetensors")):
        raise ValueError(f"{out} holds feature shards but no {MANIFEST}; use an empty directory")
    text = json.dumps({"format_version": FORMAT_VERSION, "settings": settings}, indent=2)
    tmp = out / f"{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, out / MANIFEST)


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    with tmp.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


__all__ = [
    "CACHE_DTYPES",
    "CacheStats",
    "FeatureCache",
    "build_feature_cache",
    "data_fingerprint",
    "lm_head_weight",
]
