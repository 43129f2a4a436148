"""--time-budget: the run times this machine after its data stage and sizes its steps to fit."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from draftopd.models.target import load_target
from draftopd.training.budget import (
    BUDGET_FILE,
    StepTiming,
    budget_plan,
    plan_steps,
    start_clock,
)
from draftopd.training.configs import RunConfig, SFTConfig
from draftopd.training.run import read_metrics
from draftopd.training.sft.pipeline import sft_pipeline
from draftopd.training.sft.train import time_sft, train_sft
from tests.unit.training.helpers import tiny_sft


def test_plan_fills_the_time_left_with_steps_and_evaluations() -> None:
    timing = StepTiming(step_s=1.5, first_eval_s=60.0, eval_s=25.0)
    plan = plan_steps(5000.0, timing, warmup=50, margin_s=30.0)
    # (5000 - 30 - 60 - 8 * 25) / 1.5 = 3140 steps, cut to a multiple of the 8 evaluations
    assert plan.total_steps == 3136 and plan.eval_every == 392
    assert plan.decay_steps == 2352  # the cosine ends at 3/4, the floor holds the last quarter
    spent = plan.total_steps * timing.step_s + timing.first_eval_s + 8 * timing.eval_s
    assert spent <= 5000.0 - 30.0 < spent + 8 * timing.step_s
    cfg = plan.apply(SFTConfig(warmup_steps=50, min_lr_ratio=0.2))
    assert (cfg.total_steps, cfg.decay_steps) == (3136, 2352)
    assert cfg.eval_every == cfg.checkpoint_every == 392
    assert cfg.lr_at(2352) == cfg.lr_at(3136) == pytest.approx(0.2 * cfg.lr)
    # a long warmup pushes the end of the cosine, never before it
    assert plan_steps(100.0, StepTiming(1.0, 0.0, 0.0), warmup=90, margin_s=0).decay_steps == 90
    # a run that inherits the timing's evaluator pays the one-off pass only once, in the timing
    reused = plan_steps(5000.0, timing, warmup=50, margin_s=30.0, one_off_done=True)
    assert reused.total_steps == (5000 - 30 - 9 * 25) // 1.5 // 8 * 8 == 3160


def test_plan_refuses_a_budget_too_small_for_the_schedule() -> None:
    timing = StepTiming(step_s=2.0, first_eval_s=60.0, eval_s=25.0)
    with pytest.raises(ValueError, match="larger --time-budget"):
        plan_steps(300.0, timing, warmup=50)  # 10 s left for steps
    with pytest.raises(ValueError, match="positive"):
        plan_steps(300.0, StepTiming(0.0, 1.0, 1.0), warmup=0)
    with pytest.raises(ValueError, match="time_budget"):
        SFTConfig(time_budget=0)


def test_the_clock_starts_once_and_the_plan_is_made_once(tmp_path: Path) -> None:
    started = start_clock(tmp_path, 60.0)
    assert start_clock(tmp_path, 60.0) == started  # a resumed launch keeps the first start
    with pytest.raises(ValueError, match="same budget"):
        start_clock(tmp_path, 30.0)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / BUDGET_FILE).write_text(json.dumps({"minutes": 60.0, "started_at": 5.0}))
    assert start_clock(tmp_path / "old", 60.0) == 5.0
    assert start_clock(tmp_path / "old", 60.0, fresh=True) > 5.0  # --no-resume starts anew
    calls: list[SFTConfig] = []

    def time_it(cfg: SFTConfig) -> StepTiming:
        calls.append(cfg)
        return StepTiming(step_s=0.5, first_eval_s=10.0, eval_s=5.0)

    sft = SFTConfig(warmup_steps=10)
    first = budget_plan(tmp_path, sft, time_it)
    again = budget_plan(tmp_path, sft, time_it)
    assert first == again and len(calls) == 1  # timed once; the resume reads the plan back
    saved = json.loads((tmp_path / BUDGET_FILE).read_text())
    assert saved["started_at"] == started and saved["plan"]["total_steps"] == first.total_steps
    # 60 min less the margin (30 s + 3%) and 9 evaluations at the later cost (the run inherits
    # the timing's evaluator, so its step-0 evaluation skips the one-off pass), in 0.5-s steps
    assert 6300 < first.total_steps <= (3600 - 30 - 108 - 9 * 5) / 0.5


def _budgeted(tiny_target_dir: Path, tmp_path: Path, minutes: float) -> tuple[RunConfig, SFTConfig]:
    lines = [{"prompt": f"The quick brown fox {i}"} for i in range(6)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    run = RunConfig(
        out_dir=str(tmp_path / "run"), target=str(tiny_target_dir),
        prompts=str(tmp_path / "p.jsonl"), heldout=2,
    )  # fmt: skip
    cfg = replace(
        tiny_sft(eval_num_draft_tokens=4, eval_max_new_tokens=8),
        draft_vocab_size=64, max_new_tokens=8, gen_batch_size=3, warmup_steps=0,
        feature_cache="float32", time_budget=minutes,
    )  # fmt: skip
    return run, cfg


def test_a_budgeted_pipeline_trains_on_its_saved_plan(
    tiny_target_dir: Path, tmp_path: Path
) -> None:
    """A run that has its plan (as a resumed launch finds it) follows it: its length, its
    evaluations and checkpoints every period, its cosine end; nothing is timed again."""
    run, cfg = _budgeted(tiny_target_dir, tmp_path, 60.0)
    start_clock(tmp_path / "run", 60.0)
    saved = json.loads((tmp_path / "run" / BUDGET_FILE).read_text())
    timing = {"step_s": 0.01, "first_eval_s": 0.1, "eval_s": 0.1}
    plan = {"total_steps": 16, "decay_steps": 12, "eval_every": 2, "remaining_s": 1.0}
    (tmp_path / "run" / BUDGET_FILE).write_text(
        json.dumps({**saved, "plan": {**plan, "timing": timing}})
    )
    result = sft_pipeline(run, cfg, progress=False)
    assert result.step == 16
    evaluated = [x["step"] for x in read_metrics(result.metrics_path) if x["tau"] is not None]
    assert evaluated == list(range(0, 17, 2))
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == [f"step-{s:08d}" for s in range(2, 17, 2)]
    config = json.loads((result.checkpoint / "trainer_state.json").read_text())["config"]
    assert (config["total_steps"], config["decay_steps"], config["time_budget"]) == (16, 12, 60.0)
    again = sft_pipeline(run, cfg, progress=False)  # the same command resumes: nothing left
    assert again.step == 16 and again.regen.prompts == 0


def test_a_budget_too_small_stops_after_the_data_with_a_clear_message(
    tiny_target_dir: Path, tmp_path: Path
) -> None:
    """The data stage alone outlasts a 6-millisecond budget: the plan is refused, the data kept."""
    run, cfg = _budgeted(tiny_target_dir, tmp_path, 0.0001)
    with pytest.raises(ValueError, match="larger --time-budget"):
        sft_pipeline(run, cfg, progress=False)
    saved = json.loads((tmp_path / "run" / BUDGET_FILE).read_text())
    assert saved["minutes"] == 0.0001 and "plan" not in saved
    assert list((tmp_path / "run" / "data").glob("shard-*.jsonl"))
    with pytest.raises(ValueError, match="same budget"):
        sft_pipeline(run, replace(cfg, time_budget=0.0002), progress=False)


def test_time_sft_times_real_steps_and_evaluations(tiny_target_dir: Path, tmp_path: Path) -> None:
    """time_sft on the tiny target: positive step and evaluation times, nothing left behind in
    the run directory (its throwaway drafter trains in a scratch directory)."""
    run, cfg = _budgeted(tiny_target_dir, tmp_path, 60.0)
    with pytest.raises(ValueError, match="larger --time-budget"):  # builds the data, then stops
        sft_pipeline(run, replace(cfg, time_budget=0.0001), progress=False)
    target = load_target(str(tiny_target_dir))
    data, features = tmp_path / "run" / "data", tmp_path / "run" / "features"
    timing, evaluator = time_sft(
        target, data, cfg, features=features, eval_prompts=[[1, 2, 3], [4, 5]], steps=2
    )
    assert timing.step_s > 0 and timing.first_eval_s > 0 and timing.eval_s > 0
    assert not (tmp_path / "run" / "checkpoints").exists()
    # the run that inherits the evaluator scores its drafter as one that builds its own
    short = replace(cfg, total_steps=1, eval_every=1, checkpoint_every=0, time_budget=None)
    kept = train_sft(
        target, data, tmp_path / "a", short, progress=False, features=features,
        eval_prompts=[[1, 2, 3], [4, 5]], evaluator=evaluator,
    )  # fmt: skip
    fresh = train_sft(
        target, data, tmp_path / "b", short, progress=False, features=features,
        eval_prompts=[[1, 2, 3], [4, 5]],
    )  # fmt: skip
    assert [x["tau"] for x in kept.history] == [x["tau"] for x in fresh.history]
    assert kept.history[0]["tau"] is not None
