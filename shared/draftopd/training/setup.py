"""What every training pipeline does first, from its run section (``RunConfig``).

Load the prompts and split off the held-out ones (with ``self_prompts``, after the target has
written its own requests, interleaved with them), set the CPU threads, load the target, and write
the run record (``run.json``: the kind of run, both sections, the prompt split). SFT and Draft-OPD
share it, so both measure tau on the same held-out prompts when they share a corpus.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from draftopd.models.target import TargetModel, load_target
from draftopd.prompts import Prompt, load_prompts, render_prompt
from draftopd.training.configs import RunConfig
from draftopd.training.data.corpus import (
    PromptSplit,
    interleave_prompts,
    load_training_prompts,
    split_prompts,
)
from draftopd.training.data.self_instruct import self_instruct
from draftopd.training.run import write_run_record

logger = logging.getLogger(__name__)

SELF_PROMPTS_FILE = "self_prompts.jsonl"  # in the run directory, with --self-prompts


@dataclass(frozen=True)
class RunSetup:
    target: TargetModel
    split: PromptSplit  # the training prompts and the held-out ones
    eval_prompts: list[list[int]]  # the held-out prompts, rendered (chat template) to ids

    @property
    def heldout_ids(self) -> tuple[str, ...]:
        return tuple(p.id for p in self.split.heldout)

    def train_prompts(self) -> list[list[int]]:
        """The training prompts, rendered to ids."""
        return [render_prompt(self.target.tokenizer, p) for p in self.split.train]


def resolved_device(run: RunConfig) -> str:
    """The run's device: as given, else cuda when available, else cpu."""
    return run.device or ("cuda" if torch.cuda.is_available() else "cpu")


def prepare_run(run: RunConfig, *, kind: str, stage: dict[str, Any]) -> RunSetup:
    """Threads, prompts, target and run record for a ``kind`` run ("sft" or "draft_opd") whose
    stage section is ``stage``."""
    prompts = load_training_prompts(run.prompts, seed=run.corpus_seed, min_prompts=run.corpus_size)
    # bad prompt flags fail before the target loads, unless the target must write prompts first
    split = None if run.self_prompts else _split(run, prompts)
    if run.threads is not None:
        torch.set_num_threads(run.threads)  # oversubscribed CPUs slow torch down many times
    target = load_target(run.target, device=resolved_device(run), dtype=run.dtype)
    out = Path(run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if split is None:
        split = _split(run, interleave_prompts(_self_prompts(run, target, out), prompts))
    write_run_record(
        out,
        {
            "kind": kind,
            "run": run.to_dict(),
            kind: stage,
            "num_train_prompts": len(split.train),
            "heldout_ids": [p.id for p in split.heldout],
        },
    )
    logger.info(
        "%s on %d prompts (%d held out for tau) with target %s on %s",
        kind, len(split.train), len(split.heldout), run.target, target.device,
    )  # fmt: skip
    return RunSetup(
        target=target,
        split=split,
        eval_prompts=[render_prompt(target.tokenizer, p) for p in split.heldout],
    )


def _split(run: RunConfig, prompts: list[Prompt]) -> PromptSplit:
    return split_prompts(prompts, heldout=run.heldout, limit=run.limit, skip=run.skip)


def _self_prompts(run: RunConfig, target: TargetModel, out: Path) -> list[Prompt]:
    """``run.self_prompts`` requests the target wrote itself, in ``<out>/self_prompts.jsonl``
    (sampled now where the file holds fewer; seeded by the corpus seed, so reruns agree). They are
    sampled at ``run.self_prompts_dtype`` when given (a bfloat16 copy is faster on CPUs that
    multiply bf16 natively); only the requests come from that copy."""
    path = out / SELF_PROMPTS_FILE
    dtype = run.self_prompts_dtype or run.dtype
    sampler = (
        target
        if dtype == run.dtype
        else load_target(run.target, device=str(target.device), dtype=dtype)
    )
    stats = self_instruct(sampler, path, count=run.self_prompts, seed=run.corpus_seed)
    if stats.added:
        logger.info("self-instruct prompts: %s", stats.summary())
    return load_prompts(path, limit=run.self_prompts)


__all__ = ["SELF_PROMPTS_FILE", "RunSetup", "prepare_run", "resolved_device"]
