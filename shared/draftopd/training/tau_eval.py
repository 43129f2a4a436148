"""Greedy tau of many drafter checkpoints on one prompt set, without decoding once per checkpoint.

Greedy speculative decoding commits the target's own greedy text, whatever the drafter is. So the
text and its target features are computed once (``greedy_continuations`` and one batched target
forward). Each checkpoint then needs only the drafter's drafts from every anchor and the engine's
cycle walk (``greedy_rollouts``). The tau printed is the one ``draftopd bench`` reports for the
same prompts, K and ``max_new_tokens`` (stop at EOS included), up to floating-point near-ties;
a test checks equality with the engine on a tiny model, and docs/benchmarks.md compares it with
``draftopd bench`` on SmolLM2.

``evaluate_runs`` scores every checkpoint of training runs and writes, per run, a jsonl with the
fields of ``metrics.jsonl`` (step, tau, elapsed_s) so ``draftopd train compare`` plots it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from draftopd.models.checkpoint import load_drafter
from draftopd.models.drafter import Drafter
from draftopd.models.target import TargetModel
from draftopd.training.opd.greedy_rollouts import (
    SimulatedCycle,
    draft_everywhere,
    greedy_continuations,
    right_pad,
    text_features,
    walk_cycles,
)
from draftopd.training.run import run_checkpoints

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TauResult:
    tau: float  # committed tokens / cycles over all prompts
    cycles: int
    committed: int
    acceptance_by_position: list[float]  # share of slot-j drafts accepted, j = 1..K
    per_prompt_tau: list[float]


def summarize_cycles(per_prompt: Sequence[Sequence[SimulatedCycle]], slots: int) -> TauResult:
    proposed = [0] * slots
    accepted = [0] * slots
    for prompt_cycles in per_prompt:
        for c in prompt_cycles:
            for j in range(len(c.proposed)):
                proposed[j] += 1
                accepted[j] += int(j < c.accepted)
    total = sum(len(c) for c in per_prompt)
    committed = sum(len(x.committed) for c in per_prompt for x in c)
    return TauResult(
        tau=committed / total if total else 0.0,
        cycles=total,
        committed=committed,
        acceptance_by_position=[
            a / p if p else 0.0 for a, p in zip(accepted, proposed, strict=True)
        ],
        per_prompt_tau=[
            sum(len(x.committed) for x in c) / len(c) if c else 0.0 for c in per_prompt
        ],
    )


class GreedyTauEvaluator:
    """The prompts' greedy text and target features, computed once; ``evaluate`` per drafter."""

    def __init__(
        self,
        target: TargetModel,
        prompts: Sequence[Sequence[int]],
        *,
        num_draft_tokens: int,
        max_new_tokens: int,
        batch_size: int = 8,
    ) -> None:
        if not prompts or any(len(p) < 2 for p in prompts):
            raise ValueError("need prompts of at least 2 tokens each")
        self.target = target
        self.k = num_draft_tokens
        self.max_new_tokens = max_new_tokens
        self.prompts = [list(p) for p in prompts]
        self.texts = greedy_continuations(
            target, self.prompts, max_new_tokens=max_new_tokens, batch_size=batch_size
        )
        self.batches: list[tuple[range, torch.Tensor, torch.Tensor]] = []  # rows, ids, features
        for start in range(0, len(self.prompts), batch_size):
            rows = range(start, min(start + batch_size, len(self.prompts)))
            ids, mask = right_pad([self.prompts[i] + self.texts[i] for i in rows], pad_id=0)
            ids = ids.to(target.device)
            features = text_features(target, ids, mask.to(target.device))
            self.batches.append((rows, ids, features))

    def evaluate(self, drafter: Drafter) -> TauResult:
        was_training = drafter.training
        drafter.eval()
        per_prompt: list[list[SimulatedCycle]] = []
        k = drafter.drafts_per_cycle(self.k)  # as the proposer caps it
        try:
            for rows, ids, features in self.batches:
                lens = [len(self.prompts[i]) for i in rows]
                drafts = draft_everywhere(
                    drafter, features, ids, lens, slots=k, steps=self.max_new_tokens
                ).tolist()
                for offset, row in enumerate(rows):
                    per_prompt.append(
                        walk_cycles(
                            self.texts[row],
                            drafts[offset],
                            num_draft_tokens=k,
                            max_new_tokens=self.max_new_tokens,
                            eos=self.target.eos_token_ids,
                        )
                    )
        finally:
            drafter.train(was_training)
        return summarize_cycles(per_prompt, k)


# -- checkpoints of training runs ------------------------------------------------------------------


def data_seconds(run_dir: str | Path) -> float:
    """Seconds the target spent writing an SFT run's training data (0 when not recorded)."""
    manifest = Path(run_dir) / "data" / "manifest.json"
    if not manifest.is_file():
        return 0.0
    shards = json.loads(manifest.read_text()).get("shards", [])
    return float(sum(s.get("generate_s", 0.0) for s in shards if isinstance(s, dict)))


def evaluate_runs(
    evaluator: GreedyTauEvaluator,
    runs: Sequence[tuple[str, Path]],
    *,
    init: Path | None = None,
    out_name: str = "tau_eval.jsonl",
) -> dict[str, list[dict[str, Any]]]:
    """tau at every checkpoint of each run (and at ``init`` as step 0 of every run).

    ``elapsed_s`` is the trainer's wall-clock at the checkpoint. For a run whose data the target
    wrote up front (SFT), that generation time is added in proportion to the steps taken, so both
    curves pay for their target generation."""
    target = evaluator.target
    init_line = None
    if init is not None:
        init_line = {"step": 0, "elapsed_s": 0.0, **_score(evaluator, init, target)}
    results: dict[str, list[dict[str, Any]]] = {}
    for label, run_dir in runs:
        checkpoints = run_checkpoints(run_dir)
        total = max(step for step, _, _ in checkpoints)
        data_s = data_seconds(run_dir)
        lines = [dict(init_line)] if init_line is not None else []
        for step, elapsed, path in checkpoints:
            line = {"step": step, "elapsed_s": elapsed + data_s * step / total}
            line.update(_score(evaluator, path, target))
            logger.info("%s step %d: tau %.3f", label, step, line["tau"])
            lines.append(line)
        with (Path(run_dir) / out_name).open("w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(line) + "\n" for line in lines)
        results[label] = lines
    return results


def _score(evaluator: GreedyTauEvaluator, path: Path, target: TargetModel) -> dict[str, Any]:
    result = evaluator.evaluate(load_drafter(path, target))
    data = asdict(result)
    data["checkpoint"] = str(path)
    data["tau"] = round(result.tau, 4)
    data["acceptance_by_position"] = [round(x, 4) for x in result.acceptance_by_position]
    data["per_prompt_tau"] = [round(x, 3) for x in result.per_prompt_tau]
    return data


__all__ = [
    "GreedyTauEvaluator",
    "TauResult",
    "data_seconds",
    "evaluate_runs",
    "summarize_cycles",
]
