"""Drafter checkpoints: safetensors weights + a JSON config. Never pickle.

Layout of a checkpoint directory::

    config.json        {"architecture": "eagle3", "config": {...}, "provenance": {...}}
    model.safetensors  the drafter's parameters and its d2t/t2d maps (not the shared embedding)

The ``architecture`` tag picks the drafter family (``models.families``); this module is the same
for every family.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from draftopd.models.drafter import Drafter, DrafterConfig
from draftopd.models.families import DEFAULT_ARCHITECTURE, family
from draftopd.models.target import TargetModel
from draftopd.wire.formats import CONFIG_FILE, WEIGHTS_FILE

logger = logging.getLogger(__name__)


def save_drafter(
    drafter: Drafter, directory: str | Path, *, provenance: dict[str, Any] | None = None
) -> Path:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in drafter.state_dict().items()}
    save_file(tensors, str(out / WEIGHTS_FILE))
    meta = {
        "architecture": drafter.cfg.architecture,
        "config": drafter.cfg.to_dict(),
        "provenance": provenance or {},
    }
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return out


def read_checkpoint_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"not a drafter checkpoint (missing {CONFIG_FILE}): {directory}")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"unreadable {path}: {exc}") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"{path} is not a JSON object")
    try:
        family(str(meta.get("architecture")))
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    return meta


def check_compatible(cfg: DrafterConfig, target: TargetModel) -> None:
    """Refuse a drafter built for another target (shape or declared target id)."""
    if cfg.hidden_size != target.hidden_size or cfg.target_vocab_size != target.vocab_size:
        raise ValueError(
            f"drafter built for hidden={cfg.hidden_size}, vocab={cfg.target_vocab_size}; "
            f"target has hidden={target.hidden_size}, vocab={target.vocab_size}"
        )
    if cfg.target_fingerprint and cfg.target_fingerprint != target.fingerprint:
        raise ValueError(
            f"drafter built for target {cfg.target_model!r} (fingerprint "
            f"{cfg.target_fingerprint}), not {target.name!r} ({target.fingerprint})"
        )
    if max(cfg.feature_layers) >= target.num_layers:
        raise ValueError(
            f"feature layers {cfg.feature_layers} exceed target depth {target.num_layers}"
        )


def load_drafter(directory: str | Path, target: TargetModel) -> Drafter:
    """Load a checkpoint of any family onto the target's device and dtype, sharing its
    embedding."""
    meta = read_checkpoint_meta(directory)
    kind = family(meta["architecture"])
    cfg = kind.config_from_dict(meta["config"])
    check_compatible(cfg, target)
    drafter = kind.build(cfg)
    weights_path = Path(directory) / WEIGHTS_FILE
    try:
        tensors = load_file(str(weights_path))
    except (OSError, SafetensorError) as exc:
        raise ValueError(f"unreadable drafter weights {weights_path}: {exc}") from exc
    missing, unexpected = drafter.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint tensors mismatch: missing={missing}, unexpected={unexpected}")
    drafter.attach_embedding(target.embed_tokens)
    return drafter.to(device=target.device, dtype=target.dtype).eval()


# 8,000 covers 98.4% of SmolLM2's response tokens (docs/benchmarks.md, issue #14); larger-vocab
# targets may want 32,000 (EAGLE-3's choice for Llama 3): set draft_vocab_size.
DEFAULT_DRAFT_VOCAB = 8000


def random_drafter_for(
    target: TargetModel,
    *,
    seed: int = 0,
    draft_vocab_size: int | None = None,
    architecture: str = DEFAULT_ARCHITECTURE,
    **family_options: Any,
) -> Drafter:
    """A seeded random-init drafter of a family for any target (before any training exists).
    ``family_options`` go to the family's config (dflash: ``block_size``, ``num_layers``)."""
    kind = family(architecture)
    cfg = kind.config_for_target(
        target.config,
        feature_layers=target.feature_layers,
        draft_vocab_size=draft_vocab_size or min(DEFAULT_DRAFT_VOCAB, target.vocab_size),
        target_model=target.name,
        target_fingerprint=target.fingerprint,
        **family_options,
    )
    drafter = kind.random(cfg, seed=seed)
    drafter.attach_embedding(target.embed_tokens)
    return drafter.to(device=target.device, dtype=target.dtype).eval()


__all__ = [
    "CONFIG_FILE",
    "DEFAULT_DRAFT_VOCAB",
    "WEIGHTS_FILE",
    "check_compatible",
    "load_drafter",
    "random_drafter_for",
    "read_checkpoint_meta",
    "save_drafter",
]
