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

The cache mirrors a ``regenerate`` data directory shard by shard (``out_dir``):

- ``shard-00000.safetensors``, ...: for data shard ``shard-00000.jsonl``, its samples' rows
  concatenated: ``features`` [N, 3H], ``hidden`` [N, H], ``offsets`` [count + 1] (int64; sample i
  owns rows offsets[i]:offsets[i+1]); the metadata holds the data shard's fingerprint (sha256 of
  its token ids). Each file is written once, atomically; one that exists is complete.
- ``manifest.json``: format version, target fingerprint, feature layers, dtype and max_seq_len.

A feature shard is written either by greedy regeneration itself (``batched_greedy`` captures the
features as it decodes, so data generation pays for them only once) or by
:func:`build_feature_cache`, which encodes every data shard that has no matching feature shard
(sampled data, or data from an earlier run). Sequences longer than ``max_seq_len`` are cut on the
right exactly as :func:`collate` cuts them. A cache built for other settings or another target
is refused (``ValueError``); a data shard whose content changed is encoded again.
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
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from draftopd.models.target import TargetModel
from draftopd.training.data.batches import collate, target_pass
from draftopd.training.data.regenerate import Sample, iter_shards

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CACHE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SELF_CHECK_ATOL = 1e-3  # hidden @ W.T must reproduce the model's fp32 logits (reassociation only)


@dataclass(frozen=True)
class FeatureSpec:
    """Where and how to cache features: the cache directory, storage dtype, rows per sample."""

    out_dir: Path
    dtype: str = "bfloat16"
    max_seq_len: int = 1024

    def __post_init__(self) -> None:
        if self.dtype not in CACHE_DTYPES:
            raise ValueError(
                f"cache dtype {self.dtype!r} not supported; choose one of {list(CACHE_DTYPES)}"
            )
        if self.max_seq_len < 1:
            raise ValueError(f"max_seq_len must be positive, got {self.max_seq_len}")

    def settings(self, target: TargetModel) -> dict[str, Any]:
        return {
            "target": target.fingerprint,
            "feature_layers": list(target.feature_layers),
            "dtype": self.dtype,
            "max_seq_len": self.max_seq_len,
        }


@dataclass(frozen=True)
class CacheStats:
    """What one :func:`build_feature_cache` call did."""

    samples: int  # samples encoded by this call
    tokens: int  # tokens (rows) encoded by this call
    seconds: float  # wall-clock time of the call
    shards: int  # shards written by this call
    bytes_per_token: int  # features + hidden, at the cache's dtype


def shard_fingerprint(samples: Sequence[Sample]) -> str:
    """sha256 of the samples' ids and tokens, in order (what a feature shard was built from)."""
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(
            json.dumps([sample.prompt_id, sample.prompt_ids, sample.response_ids]).encode()
        )
    return digest.hexdigest()


def lm_head_weight(target: TargetModel) -> torch.Tensor:
    """The target's LM head matrix [V, H]; only a bias-free linear head can be recomputed."""
    head = target.model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        raise ValueError("the feature cache needs a bias-free linear LM head on the target")
    return head.weight


def open_cache_dir(spec: FeatureSpec, target: TargetModel) -> None:
    """Create the cache directory (or check it was built with the same settings); drop the
    temporary files of an interrupted write."""
    out = spec.out_dir
    out.mkdir(parents=True, exist_ok=True)
    settings = spec.settings(target)
    manifest = _read_manifest(out)
    if manifest is not None:
        for key, value in settings.items():
            if manifest["settings"].get(key) != value:
                raise ValueError(
                    f"{out / MANIFEST} was built with a different {key} "
                    f"({manifest['settings'].get(key)!r}, now {value!r}); use a new directory"
                )
    elif any(out.glob("shard-*.safetensors")):
        raise ValueError(f"{out} holds feature shards but no {MANIFEST}; use an empty directory")
    else:
        text = json.dumps({"format_version": FORMAT_VERSION, "settings": settings}, indent=2)
        tmp = out / f"{MANIFEST}.{os.getpid()}.tmp"
        tmp.write_text(text + "\n", encoding="utf-8")
        os.replace(tmp, out / MANIFEST)
    for stale in out.glob("*.tmp"):
        stale.unlink()


def write_feature_shard(
    spec: FeatureSpec,
    data_shard: str,
    samples: Sequence[Sample],
    rows: Sequence[tuple[torch.Tensor, torch.Tensor]],  # per sample: features [n, 3H], hidden
) -> Path:
    """Store the rows of one data shard's samples (each cut to max_seq_len), atomically."""
    dtype = CACHE_DTYPES[spec.dtype]
    lengths = [_rows(s, spec.max_seq_len) for s in samples]
    for (features, hidden), n in zip(rows, lengths, strict=True):
        if features.shape[0] < n or hidden.shape[0] < n:
            raise ValueError(f"a sample of {data_shard} needs {n} feature rows")
    tensors = {
        "features": torch.cat([f[:n].to(dtype) for (f, _), n in zip(rows, lengths, strict=True)]),
        "hidden": torch.cat([h[:n].to(dtype) for (_, h), n in zip(rows, lengths, strict=True)]),
        "offsets": torch.tensor([0, *lengths], dtype=torch.long).cumsum(0),
    }
    path = _feature_path(spec.out_dir, data_shard)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_file(
        {k: v.contiguous().cpu() for k, v in tensors.items()},
        str(tmp),
        metadata={"data_shard": data_shard, "fingerprint": shard_fingerprint(samples)},
    )
    with tmp.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path


def build_feature_cache(
    target: TargetModel,
    data_dir: str | Path,
    spec: FeatureSpec,
    *,
    batch_size: int = 8,
    progress: bool = True,
) -> CacheStats:
    """Encode every data shard of ``data_dir`` whose feature shard is missing or stale."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    start = time.perf_counter()
    open_cache_dir(spec, target)
    head = lm_head_weight(target)
    shards = list(iter_shards(data_dir))
    todo = [(name, s) for name, s in shards if not _is_current(spec.out_dir, name, s)]
    tokens = 0
    total = sum(len(s) for _, s in todo)
    with tqdm(total=total, desc="feature cache", unit="sample", disable=not progress) as bar:
        for name, samples in todo:
            rows = _encode(target, head, samples, spec.max_seq_len, batch_size, bar)
            write_feature_shard(spec, name, samples, rows)
            tokens += sum(f.shape[0] for f, _ in rows)
    stats = CacheStats(
        samples=total,
        tokens=tokens,
        seconds=time.perf_counter() - start,
        shards=len(todo),
        bytes_per_token=4 * target.hidden_size * CACHE_DTYPES[spec.dtype].itemsize,
    )
    logger.info("feature cache %s: %s", spec.out_dir, stats)
    return stats


def _rows(sample: Sample, max_seq_len: int) -> int:
    return min(len(sample.prompt_ids) + len(sample.response_ids), max_seq_len)


def _encode(
    target: TargetModel,
    head: torch.Tensor,
    samples: Sequence[Sample],
    max_seq_len: int,
    batch_size: int,
    bar: Any,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(features, final hidden) of each sample, from right-padded batches of similar length."""
    lengths = [_rows(s, max_seq_len) for s in samples]
    order = sorted(range(len(samples)), key=lambda i: lengths[i])
    rows: list[tuple[torch.Tensor, torch.Tensor]] = [(torch.empty(0), torch.empty(0))] * len(order)
    for begin in range(0, len(order), batch_size):
        chosen = order[begin : begin + batch_size]
        batch = collate([samples[i] for i in chosen], pad_id=0, max_length=max_seq_len)
        out = target_pass(target, batch.input_ids, batch.attention_mask)
        _self_check(out.logits, out.hidden, head)
        for k, i in enumerate(chosen):
            rows[i] = (out.features[k, : lengths[i]].cpu(), out.hidden[k, : lengths[i]].cpu())
        bar.update(len(chosen))
    return rows


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
    """A complete cache of a data directory, loaded in memory; :meth:`batch` assembles what one
    SFT step needs."""

    def __init__(self, out_dir: str | Path, data_dir: str | Path, target: TargetModel) -> None:
        out = Path(out_dir)
        manifest = _read_manifest(out)
        if manifest is None:
            raise ValueError(f"{out} has no {MANIFEST}; build it with build_feature_cache()")
        settings = manifest["settings"]
        for key, value in FeatureSpec(out, settings["dtype"], 1).settings(target).items():
            if key in ("target", "feature_layers") and settings.get(key) != value:
                raise ValueError(f"feature cache {out} was built for a different {key}")
        self.dtype: str = settings["dtype"]
        self.max_seq_len: int = settings["max_seq_len"]
        self.rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, samples in iter_shards(data_dir):
            if not _is_current(out, name, samples):
                raise ValueError(
                    f"feature cache {out} has no current shard for {name}: "
                    "run build_feature_cache() on this data first"
                )
            shard = load_file(str(_feature_path(out, name)))
            offsets = shard["offsets"].tolist()
            for sample, (a, b) in zip(samples, itertools.pairwise(offsets), strict=True):
                self.rows[sample.prompt_id] = (shard["features"][a:b], shard["hidden"][a:b])

    def batch(
        self, samples: Sequence[Sample], *, max_seq_len: int, head: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded (features [b, T, 3H], logits [b, T, Vd]) of ``samples``.

        ``head`` is the LM head restricted to the draft vocabulary ([Vd, H], float32): the logits
        are over the draft vocabulary, in d2t order. T matches ``collate(..., max_length)``."""
        if max_seq_len > self.max_seq_len:
            raise ValueError(
                f"the cache keeps {self.max_seq_len} tokens per sequence; "
                f"max_seq_len {max_seq_len} needs a cache built with at least that"
            )
        picked = [self.rows[s.prompt_id] for s in samples]
        lengths = [_rows(s, max_seq_len) for s in samples]
        width = max(lengths)
        features = torch.zeros(len(picked), width, picked[0][0].shape[1])
        hidden = torch.zeros(len(picked), width, picked[0][1].shape[1])
        for row, ((f, h), n) in enumerate(zip(picked, lengths, strict=True)):
            features[row, :n] = f[:n].float()
            hidden[row, :n] = h[:n].float()
        with torch.no_grad():
            logits = hidden.to(head.device) @ head.T  # [b, T, Vd]
        return features.to(head.device), logits


def _is_current(out: Path, data_shard: str, samples: Sequence[Sample]) -> bool:
    path = _feature_path(out, data_shard)
    if not path.is_file():
        return False
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    return metadata.get("fingerprint") == shard_fingerprint(samples)


def _feature_path(out: Path, data_shard: str) -> Path:
    return out / (Path(data_shard).stem + ".safetensors")


def _read_manifest(out: Path) -> dict[str, Any] | None:
    path = out / MANIFEST
    if not path.is_file():
        return None
    manifest: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {manifest.get('format_version')!r}")
    return manifest


__all__ = [
    "CACHE_DTYPES",
    "CacheStats",
    "FeatureCache",
    "FeatureSpec",
    "build_feature_cache",
    "lm_head_weight",
    "open_cache_dir",
    "shard_fingerprint",
    "write_feature_shard",
]
