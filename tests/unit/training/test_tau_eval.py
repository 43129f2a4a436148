"""The checkpoint tau evaluator must report what greedy speculative decoding measures."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from draftopd.models.checkpoint import random_drafter_for
from draftopd.models.drafter import Drafter
from draftopd.models.target import TargetModel
from draftopd.speculative.engine import DecodeEngine
from draftopd.speculative.sampling import SamplingParams
from draftopd.training.data.regenerate import Sample
from draftopd.training.opd.train import OPDConfig, train_opd
from draftopd.training.tau_eval import GreedyTauEvaluator, evaluate_runs


def _engine_stats(
    target: TargetModel, drafter: Drafter, prompts: list[list[int]], k: int, max_new: int
) -> tuple[float, list[float]]:
    engine = DecodeEngine(target, num_draft_tokens=k)
    committed = cycles = 0
    accepted, proposed = [0] * k, [0] * k
    for ids in prompts:
        stats = engine.generate(
            ids, SamplingParams(max_new_tokens=max_new), proposer=drafter.proposer()
        ).stats
        committed, cycles = committed + stats.committed, cycles + stats.cycles
        for j, (a, p) in enumerate(
            zip(stats.accepted_by_position, stats.proposed_by_position, strict=True)
        ):
            accepted[j] += a
            proposed[j] += p
    return committed / cycles, [a / p for a, p in zip(accepted, proposed, strict=True)]


def test_tau_equals_the_engine_for_trained_and_random_drafters(
    sharp_target: TargetModel, half_trained_drafter: Drafter
) -> None:
    generator = torch.Generator().manual_seed(21)
    prompts = [torch.randint(4, 300, (n,), generator=generator).tolist() for n in (5, 9, 3, 7)]
    evaluator = GreedyTauEvaluator(
        sharp_target, prompts, num_draft_tokens=4, max_new_tokens=20, batch_size=3
    )
    taus = []
    for drafter in (half_trained_drafter, random_drafter_for(sharp_target, seed=1)):
        result = evaluator.evaluate(drafter)
        tau, by_position = _engine_stats(sharp_target, drafter, prompts, 4, 20)
        assert result.tau == tau
        assert result.acceptance_by_position == by_position
        assert len(result.per_prompt_tau) == 4
        taus.append(tau)
    assert taus[0] > taus[1] + 0.1  # the trained drafter is accepted more than a random one


def test_evaluate_runs_scores_every_checkpoint_for_train_compare(
    sharp_target: TargetModel,
    half_trained_drafter: Drafter,
    corpus: tuple[list[Sample], list[list[int]]],
    tmp_path: Path,
) -> None:
    init = tmp_path / "init"
    from draftopd.models.checkpoint import save_drafter

    save_drafter(half_trained_drafter, init)
    cfg = OPDConfig(
        total_steps=2,
        prompts_per_step=2,
        num_draft_tokens=3,
        max_new_tokens=12,
        eval_every=0,
        checkpoint_every=1,
        rollout_mode="batched",
    )
    prompts = [list(s.prompt_ids) for s in corpus[0][:8]]
    train_opd(sharp_target, half_trained_drafter, prompts, tmp_path / "opd", cfg, progress=False)
    evaluator = GreedyTauEvaluator(sharp_target, corpus[1], num_draft_tokens=3, max_new_tokens=16)
    results = evaluate_runs(evaluator, [("opd", tmp_path / "opd")], init=init)
    lines = [json.loads(x) for x in (tmp_path / "opd" / "tau_eval.jsonl").read_text().splitlines()]
    assert lines == results["opd"]
    assert [x["step"] for x in lines] == [0, 1, 2]
    assert lines[0]["elapsed_s"] == 0 < lines[1]["elapsed_s"] < lines[2]["elapsed_s"]
    assert lines[0]["tau"] == round(evaluator.evaluate(half_trained_drafter).tau, 4)
    assert all(1.0 <= x["tau"] <= 4.0 and len(x["acceptance_by_position"]) == 3 for x in lines)
