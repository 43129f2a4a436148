"""Fit an SFT run into a wall-clock budget (``draftopd train sft --time-budget MINUTES``).

The recipe's length in steps depends on the machine: the same command took 95 minutes on one
2-vCPU CPU and would take 140 on another. With a budget the run sizes itself instead:

1. the first launch writes ``<out>/budget.json`` with the time it started; later launches
   (resumes) keep that start, so the budget counts the whole run, interruptions included;
2. after the data stage (self-instruct prompts, target answers, feature cache), the pipeline
   times a few optimizer steps and two held-out evaluations of a throwaway drafter on this
   machine (``time_sft``); the first evaluation's one-off target pass over the held-out prompts
   is handed on to the run, whose step-0 evaluation then costs no more than a later one;
3. :func:`plan_steps` turns what is left of the budget into ``total_steps`` (a multiple of the
   number of evaluations), ``decay_steps`` at ``decay_share`` of them (the floor is then held over
   the last quarter, as the recipe does), and ``eval_every`` = ``checkpoint_every`` = one
   evaluation period. The plan is written into ``budget.json`` once; a resumed run reuses it, so
   its learning-rate schedule and data order stay those of an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from draftopd.training.configs import SFTConfig

logger = logging.getLogger(__name__)

BUDGET_FILE = "budget.json"
EVALUATIONS = 8  # held-out evaluations after step 0 (the recipe's cadence)
DECAY_SHARE = 0.75  # the cosine ends here; the floor holds over the last quarter
MARGIN_SHARE = 0.03  # of the budget, kept back for timing noise and the final checkpoint
MARGIN_S = 30.0
MARGIN_CAP = 0.1  # of the budget, at most (short budgets: tests, quick looks)


@dataclass(frozen=True)
class StepTiming:
    """What a budget plan needs from this machine, in seconds."""

    step_s: float  # one optimizer step (batch read, forward, backward, AdamW)
    first_eval_s: float  # the run's first held-out evaluation (the target's one-off pass included)
    eval_s: float  # each later evaluation


@dataclass(frozen=True)
class BudgetPlan:
    total_steps: int
    decay_steps: int
    eval_every: int  # also the checkpoint period
    remaining_s: float  # of the budget when the plan was made
    timing: StepTiming

    def apply(self, sft: SFTConfig) -> SFTConfig:
        return replace(
            sft,
            total_steps=self.total_steps,
            decay_steps=self.decay_steps,
            eval_every=self.eval_every,
            checkpoint_every=self.eval_every,
        )


def plan_steps(
    remaining_s: float,
    timing: StepTiming,
    *,
    warmup: int,
    evaluations: int = EVALUATIONS,
    decay_share: float = DECAY_SHARE,
    margin_s: float = MARGIN_S,
    one_off_done: bool = False,
) -> BudgetPlan:
    """The longest run that fits ``remaining_s``: steps plus the step-0 evaluation plus one
    evaluation per period, with ``margin_s`` kept back. Steps are a multiple of ``evaluations``;
    the cosine ends at ``decay_share`` of them, never before the warmup does. ``one_off_done``:
    the run inherits the timing's evaluator, so its step-0 evaluation costs a later one's."""
    if timing.step_s <= 0 or timing.eval_s < 0 or timing.first_eval_s < 0:
        raise ValueError(f"step and evaluation times must be positive, got {timing}")
    first = timing.eval_s if one_off_done else timing.first_eval_s
    usable = remaining_s - margin_s - first - evaluations * timing.eval_s
    steps = int(usable // timing.step_s) // evaluations * evaluations
    least = max(evaluations, warmup)
    if steps < least:
        raise ValueError(
            f"the time budget leaves {remaining_s:.0f} s for training: {max(steps, 0)} steps of "
            f"{timing.step_s:.2f} s after {1 + evaluations} evaluations, fewer than the {least} "
            "the schedule needs; give a larger --time-budget"
        )
    decay = max(warmup, round(steps * decay_share))
    return BudgetPlan(steps, decay, steps // evaluations, remaining_s, timing)


def start_clock(out: Path, minutes: float, *, fresh: bool = False) -> float:
    """The run's start (epoch seconds): written by its first launch, read back by later ones
    (``fresh``: started anew, as a ``--no-resume`` launch does)."""
    path = out / BUDGET_FILE
    if path.is_file() and not fresh:
        saved = json.loads(path.read_text(encoding="utf-8"))
        if float(saved["minutes"]) != minutes:
            raise ValueError(
                f"{out} was started with --time-budget {saved['minutes']}, not {minutes}; "
                "resume with the same budget or use a new out_dir"
            )
        return float(saved["started_at"])
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    _write(path, {"minutes": minutes, "started_at": started})
    return started


def budget_plan(out: Path, sft: SFTConfig, time_it: Callable[[SFTConfig], StepTiming]) -> SFTConfig:
    """``sft`` with the plan of ``budget.json`` applied; the first call that gets here times this
    machine with ``time_it`` and saves the plan. Needs :func:`start_clock` to have run. The run
    is expected to reuse the timing's held-out evaluator (the target's one-off pass)."""
    path = out / BUDGET_FILE
    saved = json.loads(path.read_text(encoding="utf-8"))
    if "plan" in saved:
        plan = _read_plan(saved["plan"])
        logger.info("time budget: reusing the plan of %s (%d steps)", path, plan.total_steps)
        return plan.apply(sft)
    timing = time_it(sft)
    remaining = float(saved["started_at"]) + 60.0 * float(saved["minutes"]) - time.time()
    budget_s = 60.0 * float(saved["minutes"])
    margin = min(MARGIN_S + MARGIN_SHARE * budget_s, MARGIN_CAP * budget_s)
    plan = plan_steps(remaining, timing, warmup=sft.warmup, margin_s=margin, one_off_done=True)
    _write(path, {**saved, "plan": asdict(plan)})
    logger.info(
        "time budget: %.1f min left; %.2f s per step, evaluations %.0f s then %.0f s -> %d steps "
        "(cosine to step %d, an evaluation and a checkpoint every %d)",
        remaining / 60, timing.step_s, timing.first_eval_s, timing.eval_s, plan.total_steps,
        plan.decay_steps, plan.eval_every,
    )  # fmt: skip
    return plan.apply(sft)


def _read_plan(raw: dict[str, object]) -> BudgetPlan:
    timing = raw["timing"]
    if not isinstance(timing, dict):
        raise ValueError(f"malformed budget plan: {raw}")
    fields = {k: v for k, v in raw.items() if k != "timing"}
    return BudgetPlan(**fields, timing=StepTiming(**timing))  # type: ignore[arg-type]


def _write(path: Path, payload: dict[str, object]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)


__all__ = [
    "BUDGET_FILE",
    "BudgetPlan",
    "StepTiming",
    "budget_plan",
    "plan_steps",
    "start_clock",
]
