"""Draft-OPD training (DRAFT_OPD.md, "The loop"): rollouts with the current drafter, replay from the
recorded error positions, one AdamW step, repeat.

The pieces are separate so the services can share them:
- ``rollouts.make_rollouts``: what a rollout worker runs (the engine with recording on);
- ``OPDLearner.update``: what the trainer runs on the records it read (replay, loss, one step);
- ``train_opd``: both in one process, for experiments (``draftopd train opd``).

``out_dir`` has the same layout as SFT's (metrics.jsonl, checkpoints/step-XXXXXXXX/ with
safetensors weights, optimizer moments and trainer_state.json), so ``draftopd train curve`` plots
it. Prompt batches are a pure function of the step and greedy rollouts are deterministic, so a
resumed run repeats exactly what an uninterrupted one would have done.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from draftopd.models.eagle3 import Eagle3Drafter
from draftopd.models.target import TargetModel
from draftopd.speculative.records import RolloutRecord
from draftopd.training.configs import OPDConfig
from draftopd.training.replay import SequencePlan, anchor_plan, random_anchor_plan, replay_loss
from draftopd.training.rollouts import fresh_records, make_rollouts, rollout_tau
from draftopd.training.run_state import (
    CHECKPOINT_DIR,
    METRICS_FILE,
    STATE_FILE,
    latest_checkpoint,
    load_training_state,
    resume_drafter,
    save_training_checkpoint,
    truncate_metrics,
)
from draftopd.training.schedule import make_adamw
from draftopd.training.sft import batch_indices, heldout_tau

logger = logging.getLogger(__name__)


# -- the trainer's side ---------------------------------------------------------------------------


@dataclass
class OPDLearner:
    """The trainer's side: a drafter, its optimizer, and the current version (= steps taken)."""

    target: TargetModel
    drafter: Eagle3Drafter
    cfg: OPDConfig
    optimizer: torch.optim.AdamW = field(init=False)
    step: int = 0

    def __post_init__(self) -> None:
        self.drafter.float().train()
        cfg = self.cfg
        self.optimizer = make_adamw(
            self.drafter, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
        )

    def plans(self, records: Sequence[RolloutRecord]) -> list[SequencePlan]:
        plans = [anchor_plan(r) for r in records]
        if not self.cfg.random_anchors:
            return plans
        generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.step)
        k = self.cfg.num_draft_tokens
        return [random_anchor_plan(p, k, generator) for p in plans]

    def update(self, records: Sequence[RolloutRecord]) -> dict[str, Any]:
        """One optimizer step on the replay loss of ``records``; returns the step's metrics."""
        kept = fresh_records(records, self.step, self.cfg.max_version_lag)
        if not kept:
            raise ValueError(f"no records within version lag {self.cfg.max_version_lag}")
        plans = [p for p in self.plans(kept) if p.cycles]
        if not plans:
            raise ValueError("no record has a cycle to replay")
        loss, info = replay_loss(
            self.target, self.drafter, plans, self.cfg.loss_config, self.cfg.num_draft_tokens
        )
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss.loss.backward()
        backward_s = time.perf_counter() - t0
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip or float("inf"))
        lr = self.cfg.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.step += 1
        return {
            **loss.to_dict(),
            **info,
            "replay_s": info["replay_s"] + backward_s,
            "optimizer_s": time.perf_counter() - t0 - backward_s,
            "records": len(kept),
            "dropped_records": len(records) - len(kept),
            "grad_norm": float(norm),
            "lr": lr,
        }


# -- the single-process loop -----------------------------------------------------------------------


class RolloutSource(Protocol):
    """Where the records of each step come from, and what to tell it as steps complete."""

    def records(
        self, step: int, drafter: Eagle3Drafter, prompts: list[list[int]], seeds: list[int]
    ) -> list[RolloutRecord]: ...

    def applied(self, step: int) -> None: ...  # the update of ``step`` is applied

    def checkpointed(self, step: int) -> None: ...  # a checkpoint after ``step`` updates exists


@dataclass
class LocalRollouts:
    """Roll out in this process with the learner's current drafter."""

    target: TargetModel
    cfg: OPDConfig

    def records(
        self, step: int, drafter: Eagle3Drafter, prompts: list[list[int]], seeds: list[int]
    ) -> list[RolloutRecord]:
        cfg = self.cfg
        return make_rollouts(
            self.target,
            drafter,
            prompts,
            num_draft_tokens=cfg.num_draft_tokens,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            seeds=seeds,
            drafter_version=str(step),
            mode=cfg.rollout_mode,
            batch_size=cfg.rollout_batch_size,
        )

    def applied(self, step: int) -> None:
        return None

    def checkpointed(self, step: int) -> None:
        return None


@dataclass(frozen=True)
class OPDResult:
    drafter: Eagle3Drafter
    step: int
    checkpoint: Path
    metrics_path: Path
    tau: float | None
    history: list[dict[str, Any]]


def _every(step: int, period: int) -> bool:
    return period > 0 and step % period == 0


def train_opd(
    target: TargetModel,
    drafter: Eagle3Drafter,
    prompts: Sequence[Sequence[int]],
    out_dir: str | Path,
    cfg: OPDConfig,
    *,
    eval_prompts: Sequence[Sequence[int]] = (),
    resume: bool = True,
    progress: bool = True,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    rollouts: RolloutSource | None = None,
) -> OPDResult:
    """Draft-OPD from ``drafter`` (e.g. the SFT checkpoint) on rendered ``prompts``; resumable.

    ``rollouts`` says where each step's records come from: by default this process rolls out
    itself; the trainer service passes one that asks the rollout workers (``opd_job``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not prompts:
        raise ValueError("no training prompts")
    latest = latest_checkpoint(out)
    elapsed = 0.0
    if latest is not None and not resume:
        raise ValueError(f"{out} holds checkpoints of an earlier run; resume or use a new dir")
    if latest is not None:
        saved = json.loads((latest / STATE_FILE).read_text())
        changed = sorted(k for k, v in cfg.to_dict().items() if saved["config"].get(k) != v)
        if [c for c in changed if not c.startswith(("eval_", "checkpoint_"))]:
            raise ValueError(f"cannot resume {latest}: config fields {changed} differ")
        drafter = resume_drafter(latest, target)
    learner = OPDLearner(target, drafter, cfg)
    if latest is not None:
        state = load_training_state(latest, learner.optimizer)
        learner.step, elapsed = int(state["step"]), float(state["elapsed_s"])
        truncate_metrics(out / METRICS_FILE, learner.step)
        logger.info("resumed Draft-OPD at step %d from %s", learner.step, latest)
    else:
        (out / METRICS_FILE).unlink(missing_ok=True)
    history: list[dict[str, Any]] = []
    tau: float | None = None
    source = rollouts or LocalRollouts(target, cfg)

    def evaluate() -> float | None:
        if not eval_prompts:
            return None
        return heldout_tau(
            target,
            learner.drafter,
            eval_prompts,
            num_draft_tokens=cfg.eval_num_draft_tokens,
            max_new_tokens=cfg.eval_max_new_tokens,
        )

    def log(line: dict[str, Any]) -> None:
        line = {"step": learner.step, "tau": None, **line, "elapsed_s": round(elapsed, 4)}
        with (out / METRICS_FILE).open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(line) + "\n")
        history.append(line)
        if on_step is not None:
            on_step(line)

    if learner.step == 0:
        tau = evaluate()
        log({"tau": tau})
    bar = tqdm(total=cfg.total_steps, initial=learner.step, desc="opd", disable=not progress)
    with bar:
        while learner.step < cfg.total_steps:
            step = learner.step
            chosen = batch_indices(
                step, num_samples=len(prompts), batch_size=cfg.prompts_per_step, seed=cfg.seed
            )
            t0 = time.perf_counter()
            seeds = [cfg.seed * 1_000_003 + step * 1_009 + i for i in range(len(chosen))]
            batch = [list(prompts[i]) for i in chosen]
            records = source.records(step, learner.drafter, batch, seeds)
            rollout_s = time.perf_counter() - t0
            stats = learner.update(records)
            source.applied(step)
            elapsed += time.perf_counter() - t0
            stats.update(
                rollout_s=rollout_s,
                rollout_tokens=sum(len(r.response_ids) for r in records),
                rollout_tau=rollout_tau(records),
            )
            last = learner.step == cfg.total_steps
            if last or _every(learner.step, cfg.eval_every):
                tau = evaluate()
                stats["tau"] = tau
            log({k: round(v, 5) if isinstance(v, float) else v for k, v in stats.items()})
            if last or _every(learner.step, cfg.checkpoint_every):
                save_training_checkpoint(
                    out / CHECKPOINT_DIR / f"step-{learner.step:08d}",
                    learner.drafter,
                    learner.optimizer,
                    step=learner.step,
                    elapsed_s=elapsed,
                    extra={"config": cfg.to_dict()},
                    provenance={"kind": "draft_opd", "step": learner.step, "opd": cfg.to_dict()},
                )
                source.checkpointed(learner.step)
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.3f}", tau=tau, rollout_tau=stats["rollout_tau"])
    final = latest_checkpoint(out)
    assert final is not None
    return OPDResult(learner.drafter, learner.step, final, out / METRICS_FILE, tau, history)


__all__ = [
    "LocalRollouts",
    "OPDConfig",
    "OPDLearner",
    "OPDResult",
    "RolloutSource",
    "train_opd",
]
