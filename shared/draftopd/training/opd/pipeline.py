"""``draftopd train opd``: Draft-OPD from a drafter checkpoint on corpus prompts.

Takes a run section and an OPD section (``training/configs.py``), as a train-job spec carries
them. The prompts come from the same corpus as SFT: the run section's ``skip`` passes over the
prompts SFT already trained on, so the rollouts see fresh prompts, and the held-out prompts (the
last ``heldout`` of the list) are the ones SFT measured tau on, so the two curves share a
yardstick.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.contrib.logging import logging_redirect_tqdm

from draftopd.models.checkpoint import load_drafter
from draftopd.models.target import TargetModel
from draftopd.training.configs import OPDConfig, RunConfig
from draftopd.training.opd.train import OPDResult, RolloutSource, train_opd
from draftopd.training.setup import prepare_run

logger = logging.getLogger(__name__)


def opd_pipeline(
    run: RunConfig,
    opd: OPDConfig,
    *,
    resume: bool = True,
    progress: bool = True,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    rollouts: Callable[[TargetModel], RolloutSource] | None = None,
) -> OPDResult:
    """Load the target, the starting drafter (``opd.drafter``, a local checkpoint directory) and
    the prompts, then ``train_opd``. ``rollouts`` builds the rollout source (default: roll out in
    this process)."""
    if not Path(opd.drafter).is_dir():
        raise ValueError(f"drafter checkpoint {opd.drafter!r} is not a directory")
    setup = prepare_run(run, kind="draft_opd", stage=opd.to_dict())
    target = setup.target
    drafter = load_drafter(opd.drafter, target)
    with logging_redirect_tqdm():
        result = train_opd(
            target,
            drafter,
            setup.train_prompts(),
            Path(run.out_dir),
            opd,
            eval_prompts=setup.eval_prompts,
            resume=resume,
            progress=progress,
            on_step=on_step,
            rollouts=None if rollouts is None else rollouts(target),
        )
    tau = "n/a" if result.tau is None else f"{result.tau:.3f}"
    logger.info("final checkpoint: %s (step %d); held-out tau %s", result.checkpoint, result.step,
                tau)  # fmt: skip
    return result


__all__ = ["opd_pipeline"]
