"""``draftopd train opd``: Draft-OPD from a drafter checkpoint on corpus prompts, in one process.

The prompts come from the same corpus as SFT. ``skip`` passes over the prompts SFT already
trained on, so the rollouts see fresh prompts; the held-out prompts (the last ``heldout`` of the
list) are the same ones SFT measured tau on, so the two curves share a yardstick.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from draftopd.models.checkpoint import load_drafter
from draftopd.models.target import DEFAULT_TARGET, TargetModel, load_target
from draftopd.prompts import render_prompt
from draftopd.training.config_dict import known_fields
from draftopd.training.corpus import load_training_prompts
from draftopd.training.opd import OPDConfig, OPDResult, RolloutSource, train_opd
from draftopd.training.pipeline import split_prompts

logger = logging.getLogger(__name__)

RUN_FILE = "opd_run.json"


@dataclass(frozen=True)
class OPDPipelineConfig:
    out_dir: str  # run directory: metrics.jsonl, checkpoints/, opd_run.json
    drafter: str  # starting checkpoint directory (e.g. the SFT run's final one)
    target: str = DEFAULT_TARGET
    prompts: str | None = None  # prompts JSONL; None = the built-in offline corpus
    skip: int = 0  # skip the first N non-held-out prompts (those SFT trained on)
    limit: int | None = None  # then use the next N; None = all the rest
    heldout: int = 8  # the last N prompts of the list: tau during training
    corpus_seed: int = 0
    opd: OPDConfig = field(default_factory=OPDConfig)
    device: str | None = None
    dtype: str = "float32"
    threads: int | None = None
    resume: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if self.skip < 0 or self.heldout < 0:
            raise ValueError(f"skip and heldout must be >= 0, got {self.skip}, {self.heldout}")
        for name in ("limit", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not Path(self.drafter).is_dir():
            raise ValueError(f"drafter checkpoint {self.drafter!r} is not a directory")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "opd": self.opd.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OPDPipelineConfig:
        values = known_fields(cls, data)
        if isinstance(values.get("opd"), dict):
            values["opd"] = OPDConfig.from_dict(values["opd"])
        return cls(**values)


def opd_pipeline(
    cfg: OPDPipelineConfig,
    *,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    rollouts: Callable[[TargetModel], RolloutSource] | None = None,
) -> OPDResult:
    """Load the target, the starting drafter and the prompts, then ``train_opd``. ``rollouts``
    builds the rollout source (default: roll out in this process)."""
    split = split_prompts(
        load_training_prompts(cfg.prompts, seed=cfg.corpus_seed),
        heldout=cfg.heldout,
        limit=cfg.limit,
        skip=cfg.skip,
    )
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    target = load_target(cfg.target, device=device, dtype=cfg.dtype)
    drafter = load_drafter(cfg.drafter, target)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "config": cfg.to_dict(),
        "num_train_prompts": len(split.train),
        "heldout_ids": [p.id for p in split.heldout],
    }
    tmp = out / f"{RUN_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / RUN_FILE)
    logger.info(
        "Draft-OPD from %s on %d prompts (%d held out) with target %s on %s",
        cfg.drafter, len(split.train), len(split.heldout), cfg.target, target.device,
    )  # fmt: skip
    with logging_redirect_tqdm():
        result = train_opd(
            target,
            drafter,
            [render_prompt(target.tokenizer, p) for p in split.train],
            out,
            cfg.opd,
            eval_prompts=[render_prompt(target.tokenizer, p) for p in split.heldout],
            resume=cfg.resume,
            progress=cfg.progress,
            on_step=on_step,
            rollouts=None if rollouts is None else rollouts(target),
        )
    logger.info("final checkpoint: %s (step %d); held-out tau %s", result.checkpoint, result.step,
                "n/a" if result.tau is None else f"{result.tau:.3f}")  # fmt: skip
    return result


__all__ = ["OPDPipelineConfig", "opd_pipeline"]
