"""Draft-OPD training (docs/draft_opd.md, "The loop"): rollouts with the current drafter, replay
from the recorded error positions, one AdamW step, repeat.

The pieces are separate so the services can share them:
- ``rollouts.make_rollouts``: what a rollout worker runs (the engine with recording on);
- ``OPDLearner.update``: what the trainer runs on the records it read (replay, loss, one step);
- ``train_opd``: both in one process, for experiments (``draftopd train opd``).

``out_dir`` is a run directory of ``training/run.py``, as SFT's is, so ``draftopd train curve``
plots it. Prompt batches are a pure function of the step and greedy rollouts are deterministic, so a
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

from draftopd.models.drafter import Drafter
from draftopd.models.target import TargetModel
from draftopd.speculative.records import RolloutRecord
from draftopd.training.configs import OPDConfig
from draftopd.training.data.batches import batch_indices
from draftopd.training.opd.greedy_rollouts import TargetOutputs, greedy_continuations
from draftopd.training.opd.replay import SequencePlan, anchor_plan, random_anchor_plan, replay_loss
from draftopd.training.opd.rollouts import fresh_records, make_rollouts, rollout_tau
from draftopd.training.run import METRICS_FILE, check_resume, open_run
from draftopd.training.schedule import make_adamw, optimizer_step

logger = logging.getLogger(__name__)


# -- the trainer's side ---------------------------------------------------------------------------


@dataclass
class OPDLearner:
    """The trainer's side: a drafter, its optimizer, and the current version (= steps taken)."""

    target: TargetModel
    drafter: Drafter
    cfg: OPDConfig
    optimizer: torch.optim.Optimizer | None = None  # None: a fresh AdamW (``make_adamw``)
    step: int = 0

    def __post_init__(self) -> None:
        self.drafter.float().train()
        if self.optimizer is None:
            cfg = self.cfg
            self.optimizer = make_adamw(
                self.drafter, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
            )

    def plans(self, records: Sequence[RolloutRecord]) -> list[SequencePlan]:
        plans = [anchor_plan(r) for r in records]
        if not self.cfg.random_anchors:
            return plans
        generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.step)
        k = self.drafter.drafts_per_cycle(self.cfg.num_draft_tokens)
        return [random_anchor_plan(p, k, generator) for p in plans]

    def update(
        self, records: Sequence[RolloutRecord], *, target_outputs: TargetOutputs | None = None
    ) -> dict[str, Any]:
        """One optimizer step on the replay loss of ``records``; returns the step's metrics.
        ``target_outputs``: the rollouts' own text pass, when they ran in this process."""
        kept = fresh_records(records, self.step, self.cfg.max_version_lag)
        if not kept:
            raise ValueError(f"no records within version lag {self.cfg.max_version_lag}")
        plans = [p for p in self.plans(kept) if p.cycles]
        if not plans:
            raise ValueError("no record has a cycle to replay")
        slots = self.drafter.drafts_per_cycle(self.cfg.num_draft_tokens)
        loss, info = replay_loss(
            self.target, self.drafter, plans, self.cfg.loss, slots, target_outputs=target_outputs
        )
        lr, timings = self.cfg.lr_at(self.step), dict[str, float]()
        assert self.optimizer is not None
        norm = optimizer_step(
            self.optimizer, loss.loss, lr=lr, grad_clip=self.cfg.grad_clip, timings=timings
        )
        self.step += 1
        return {
            **loss.to_dict(),
            **info,
            "replay_s": info["replay_s"] + timings["backward_s"],
            "optimizer_s": timings["step_s"],
            "records": len(kept),
            "dropped_records": len(records) - len(kept),
            "grad_norm": norm,
            "lr": lr,
        }


# -- the single-process loop -----------------------------------------------------------------------


class RolloutSource(Protocol):
    """Where the records of each step come from, and what to tell it as steps complete."""

    def records(
        self, step: int, drafter: Drafter, prompts: list[list[int]], seeds: list[int]
    ) -> list[RolloutRecord]: ...

    def applied(self, step: int) -> None: ...  # the update of ``step`` is applied

    def checkpointed(self, step: int) -> None: ...  # a checkpoint after ``step`` updates exists


GREEDY_TEXT_SLOTS = 64  # continuous-batching slots for the greedy texts, as SFT data generation
TEXTS_FILE = "rollout_texts.jsonl"


@dataclass
class LocalRollouts:
    """Roll out in this process with the learner's current drafter.

    In the batched greedy mode, with ``prompts`` (every prompt of the run) given, the target's
    greedy continuations are written once for all of them, in batches of ``GREEDY_TEXT_SLOTS``
    like SFT data generation, and kept in ``out_dir/rollout_texts.jsonl`` for a resumed run.
    Greedy text does not depend on the drafter, so every step still rolls out with the current
    drafter and gets the records it would get by decoding (docs/draft_opd.md): only the target's
    text is shared, and it is written at data-generation speed instead of 16 rows at a time.

    In the batched mode the rollouts' text pass (features and logits of each record's text) is
    kept in ``outputs`` until the step's update is applied, so the learner does not run the
    target over the same text again."""

    target: TargetModel
    cfg: OPDConfig
    prompts: Sequence[Sequence[int]] = ()
    out_dir: Path | None = None
    texts: dict[tuple[int, ...], list[int]] = field(default_factory=dict)
    outputs: TargetOutputs = field(default_factory=dict, repr=False)

    def records(
        self, step: int, drafter: Drafter, prompts: list[list[int]], seeds: list[int]
    ) -> list[RolloutRecord]:
        cfg = self.cfg
        shared = cfg.rollout_mode == "batched" and bool(self.prompts)
        self.outputs.clear()
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
            texts=self.greedy_texts(prompts) if shared else None,
            target_outputs=self.outputs if cfg.rollout_mode == "batched" else None,
        )

    def greedy_texts(self, wanted: Sequence[Sequence[int]]) -> list[list[int]]:
        """The greedy continuations of ``wanted``; the first miss writes them for every prompt."""
        if not self.texts:
            self._load()
        if any(tuple(p) not in self.texts for p in wanted):
            missing = {tuple(p) for p in [*self.prompts, *wanted]} - self.texts.keys()
            batch = [list(p) for p in sorted(missing)]
            t0 = time.perf_counter()
            texts = greedy_continuations(
                self.target,
                batch,
                max_new_tokens=self.cfg.max_new_tokens,
                batch_size=max(GREEDY_TEXT_SLOTS, self.cfg.rollout_batch_size),
            )
            seconds = time.perf_counter() - t0
            tokens = sum(len(t) for t in texts)
            logger.info(
                "greedy rollout texts: %d prompts, %d tokens in %.1f s (%.0f tokens/s)",
                len(batch),
                tokens,
                seconds,
                tokens / max(seconds, 1e-9),
            )
            self.texts.update(zip(map(tuple, batch), texts, strict=True))
            self._save(batch, texts)
        return [self.texts[tuple(p)] for p in wanted]

    def _load(self) -> None:
        path = None if self.out_dir is None else self.out_dir / TEXTS_FILE
        if path is None or not path.is_file():
            return
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # a line cut short by a crash: that prompt is written again
                continue
            if row.get("max_new_tokens") == self.cfg.max_new_tokens:
                self.texts[tuple(row["prompt"])] = list(row["text"])

    def _save(self, prompts: list[list[int]], texts: list[list[int]]) -> None:
        if self.out_dir is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        n = self.cfg.max_new_tokens
        with (self.out_dir / TEXTS_FILE).open("a", encoding="utf-8") as handle:
            for prompt, text in zip(prompts, texts, strict=True):
                handle.write(json.dumps({"max_new_tokens": n, "prompt": prompt, "text": text}))
                handle.write("\n")

    def applied(self, step: int) -> None:
        self.outputs.clear()  # the step's text pass is no longer needed

    def checkpointed(self, step: int) -> None:
        return None


@dataclass(frozen=True)
class OPDResult:
    drafter: Drafter
    step: int
    checkpoint: Path
    metrics_path: Path
    tau: float | None
    history: list[dict[str, Any]]


def train_opd(
    target: TargetModel,
    drafter: Drafter,
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
    if not prompts:
        raise ValueError("no training prompts")
    run = open_run(
        Path(out_dir),
        target,
        cfg,
        resume=resume,
        label="Draft-OPD",
        fresh_drafter=lambda: drafter,
        make_optimizer=lambda d: make_adamw(
            d, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
        ),
        check_saved=lambda saved, where: check_resume(saved, cfg, where, extendable=False),
        eval_prompts=[list(p) for p in eval_prompts],
        on_step=on_step,
    )
    learner = OPDLearner(target, run.drafter, cfg, optimizer=run.optimizer, step=run.step)
    source = rollouts or LocalRollouts(
        target, cfg, prompts=[list(p) for p in prompts], out_dir=Path(out_dir)
    )
    provenance = {"kind": "draft_opd", "opd": cfg.to_dict()}
    run.start(always=True)
    bar = tqdm(total=cfg.total_steps, initial=run.step, desc="opd", disable=not progress)
    with bar:
        while not run.done:
            step = run.step
            chosen = batch_indices(
                step, num_samples=len(prompts), batch_size=cfg.prompts_per_step, seed=cfg.seed
            )
            t0 = time.perf_counter()
            seeds = [cfg.seed * 1_000_003 + step * 1_009 + i for i in range(len(chosen))]
            batch = [list(prompts[i]) for i in chosen]
            records = source.records(step, learner.drafter, batch, seeds)
            rollout_s = time.perf_counter() - t0
            shared = source.outputs if isinstance(source, LocalRollouts) else None
            stats = learner.update(records, target_outputs=shared)
            source.applied(step)
            run.elapsed_s += time.perf_counter() - t0
            run.step = learner.step
            stats.update(
                rollout_s=rollout_s,
                rollout_tokens=sum(len(r.response_ids) for r in records),
                rollout_tau=rollout_tau(records),
            )
            rounded = {k: round(v, 5) if isinstance(v, float) else v for k, v in stats.items()}
            if run.finish_step(rounded, extra={}, provenance=provenance):
                source.checkpointed(run.step)
            bar.update(1)
            bar.set_postfix(
                loss=f"{stats['loss']:.3f}", tau=run.tau, rollout_tau=stats["rollout_tau"]
            )
    return OPDResult(
        run.drafter, run.step, run.checkpoint, run.out_dir / METRICS_FILE, run.tau, run.history
    )


__all__ = [
    "LocalRollouts",
    "OPDConfig",
    "OPDLearner",
    "OPDResult",
    "RolloutSource",
    "train_opd",
]
