"""SFT bootstrap: it learns (loss down, held-out tau up), checkpoints are safe, resume is exact."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from draftopd.models.checkpoint import load_drafter
from draftopd.models.target import TargetModel, load_target
from draftopd.training.configs import RunConfig, SFTConfig
from draftopd.training.data.batches import batch_indices
from draftopd.training.data.regenerate import Sample
from draftopd.training.run import heldout_tau, latest_checkpoint, read_metrics
from draftopd.training.schedule import warmup_cosine_lr
from draftopd.training.sft.pipeline import sft_pipeline
from draftopd.training.sft.train import choose_draft_vocab, train_sft
from tests.unit.training.helpers import tiny_sft

MAX_NEW = 32  # the corpus fixture's response length


def _config(**changes: object) -> SFTConfig:
    base = tiny_sft(
        total_steps=60,
        eval_every=20,
        eval_num_draft_tokens=4,
        eval_max_new_tokens=MAX_NEW,
        checkpoint_every=30,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def test_sft_lowers_loss_and_raises_heldout_tau(
    sharp_target: TargetModel, corpus: tuple[list[Sample], list[list[int]]], tmp_path: Path
) -> None:
    train, heldout = corpus
    embedding = sharp_target.embed_tokens.weight.detach().clone()
    cfg = _config()
    result = train_sft(sharp_target, train, tmp_path, cfg, eval_prompts=heldout, progress=False)

    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == result.history
    assert [x["step"] for x in lines] == list(range(61))
    assert {"step", "loss", "step_acc", "tau", "lr", "elapsed_s"} <= set(lines[1])
    assert [x["step"] for x in lines if x["tau"] is not None] == [0, 20, 40, 60]
    initial_tau, final_tau = lines[0]["tau"], lines[-1]["tau"]
    assert initial_tau < 1.1  # the random-init drafter is almost never accepted
    assert final_tau > initial_tau + 0.25, (initial_tau, final_tau)
    first = sum(x["loss"] for x in lines[1:11]) / 10
    last = sum(x["loss"] for x in lines[-10:]) / 10
    assert last < first - 3.0, (first, last)
    assert sum(lines[-1]["step_acc"]) / 4 > 0.3
    assert lines[1]["lr"] == pytest.approx(1e-2 / 3) and lines[-1]["lr"] < 1e-4

    # the draft vocabulary is the 96 most frequent response tokens
    expected = choose_draft_vocab(train, vocab_size=sharp_target.vocab_size, draft_vocab_size=96)
    assert torch.equal(result.drafter.d2t.cpu(), expected)
    # the target (and its shared embedding) was not trained
    torch.testing.assert_close(sharp_target.embed_tokens.weight, embedding, rtol=0, atol=0)

    # the final checkpoint is a plain drafter directory with the same held-out tau
    assert result.checkpoint == tmp_path / "checkpoints" / "step-00000060"
    loaded = load_drafter(result.checkpoint, sharp_target)
    tau = heldout_tau(sharp_target, loaded, heldout, num_draft_tokens=4, max_new_tokens=MAX_NEW)
    assert tau == pytest.approx(final_tau)


def test_resume_continues_from_the_checkpoint_and_matches_an_uninterrupted_run(
    sharp_target: TargetModel, corpus: tuple[list[Sample], list[list[int]]], tmp_path: Path
) -> None:
    train = corpus[0][:40]
    cfg = _config(total_steps=8, checkpoint_every=4, eval_every=0, weight_decay=0.1)
    straight = train_sft(sharp_target, train, tmp_path / "a", cfg, progress=False)

    class Killed(Exception):
        pass

    def kill_at_6(line: dict[str, object]) -> None:
        if line["step"] == 6:
            raise Killed

    with pytest.raises(Killed):
        train_sft(sharp_target, train, tmp_path / "b", cfg, progress=False, on_step=kill_at_6)
    partial = latest_checkpoint(tmp_path / "b")
    assert partial is not None and partial.name == "step-00000004"
    assert sorted(p.name for p in partial.iterdir()) == [
        "config.json",
        "model.safetensors",
        "optimizer.safetensors",
        "trainer_state.json",
    ]  # safetensors and JSON only: nothing pickled

    resumed = train_sft(sharp_target, train, tmp_path / "b", cfg, progress=False)
    assert resumed.resumed_from == 4 and resumed.step == 8
    assert [x["step"] for x in resumed.history] == [5, 6, 7, 8]
    steps = [json.loads(x)["step"] for x in (tmp_path / "b/metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # the lines of the lost steps 5-6 were dropped
    for (name, a), (_, b) in zip(
        straight.drafter.state_dict().items(), resumed.drafter.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    losses = [x["loss"] for x in straight.history[4:]]
    assert losses == [x["loss"] for x in resumed.history]

    # a finished run resumes to a no-op; a changed trajectory config is refused
    again = train_sft(sharp_target, train, tmp_path / "b", cfg, progress=False)
    assert again.step == 8 and again.history == []
    with pytest.raises(ValueError, match=r"\['lr'\]"):
        train_sft(sharp_target, train, tmp_path / "b", replace(cfg, lr=1e-3), progress=False)
    with pytest.raises(ValueError, match="samples differ"):
        train_sft(sharp_target, train[:39], tmp_path / "b", cfg, progress=False)
    with pytest.raises(ValueError, match="earlier run"):
        train_sft(sharp_target, train, tmp_path / "b", cfg, progress=False, resume=False)


def _tiny_run(
    target_dir: Path, tmp_path: Path, lines: list[dict[str, str]], **run: Any
) -> RunConfig:
    """A run section on the tiny target whose prompts are ``lines`` (the last 2 held out)."""
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return RunConfig(
        out_dir=str(tmp_path / "run"),
        target=str(target_dir),
        prompts=str(tmp_path / "p.jsonl"),
        heldout=2,
        **run,
    )


def test_sft_pipeline_from_a_target_spec_and_a_prompts_file(
    tiny_target_dir: Path, tmp_path: Path
) -> None:
    """The CLI / Celery entry point: a run section and an SFT section as a job spec holds them:
    target by spec, prompts from JSONL (the last 2 held out), regeneration, training, tau."""
    run = _tiny_run(
        tiny_target_dir, tmp_path, [{"prompt": f"The quick brown fox {i}"} for i in range(6)]
    )
    cfg = _config(
        total_steps=3, eval_every=0, checkpoint_every=0, draft_vocab_size=64,
        max_new_tokens=12, gen_batch_size=3,
    )  # fmt: skip
    result = sft_pipeline(run, cfg, progress=False)
    assert result.step == 3 and result.checkpoint.name == "step-00000003"
    assert result.tau is not None and 1.0 <= result.tau <= 5.0
    assert result.num_train_prompts == 4 and result.heldout_ids == ("5", "6")
    metrics = read_metrics(result.metrics_path)
    assert [x["step"] for x in metrics] == [0, 1, 2, 3]
    target = load_target(str(tiny_target_dir))
    assert load_drafter(result.checkpoint, target).cfg.draft_vocab_size == 64
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["kind"] == "sft" and record["run"] == run.to_dict()
    assert record["sft"] == cfg.to_dict()


def test_choose_draft_vocab_takes_the_most_frequent_response_tokens() -> None:
    samples = [
        Sample("a", (9, 9, 9, 9), (5, 5, 5, 2)),
        Sample("b", (9,), (2, 7, 5)),
    ]
    vocab = choose_draft_vocab(samples, vocab_size=10, draft_vocab_size=3)
    assert vocab.tolist() == [2, 5, 7]  # prompt tokens do not count
    vocab = choose_draft_vocab(samples, vocab_size=10, draft_vocab_size=5)
    assert vocab.tolist() == [0, 1, 2, 5, 7]  # unseen ids fill up from the lowest
    with pytest.raises(ValueError, match="draft_vocab_size"):
        choose_draft_vocab(samples, vocab_size=10, draft_vocab_size=11)


def test_batch_indices_visit_every_sample_once_per_epoch() -> None:
    epoch = [i for s in range(5) for i in batch_indices(s, num_samples=10, batch_size=2, seed=3)]
    assert sorted(epoch) == list(range(10))
    assert epoch != list(range(10))  # shuffled
    crossing = batch_indices(1, num_samples=5, batch_size=3, seed=0)  # items 3, 4 | 0 of epoch 2
    assert crossing[:2] == batch_indices(0, num_samples=5, batch_size=5, seed=0)[3:]
    assert batch_indices(7, num_samples=10, batch_size=2, seed=3) == batch_indices(
        7, num_samples=10, batch_size=2, seed=3
    )


def test_warmup_cosine_schedule() -> None:
    lr = [warmup_cosine_lr(s, peak_lr=1.0, warmup_steps=4, total_steps=12) for s in range(13)]
    assert lr[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr[4] == pytest.approx(1.0) and lr[8] == pytest.approx(0.5) and lr[12] == 0.0
    assert lr[3:] == sorted(lr[3:], reverse=True)
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_cosine_lr(0, peak_lr=1.0, warmup_steps=13, total_steps=12)


def test_decay_steps_reach_the_floor_early_and_hold_it() -> None:
    held = [
        warmup_cosine_lr(
            s, peak_lr=1.0, warmup_steps=2, total_steps=12, min_lr_ratio=0.2, decay_steps=8
        )
        for s in range(13)
    ]
    # the cosine from 1.0 to 0.2 over steps 2..8, then the floor to the end
    assert held[2] == pytest.approx(1.0) and held[5] == pytest.approx(0.6)
    assert held[8:] == pytest.approx([0.2] * 5)
    assert held[2:9] == sorted(held[2:9], reverse=True) and held[7] > 0.2
    full = [
        warmup_cosine_lr(s, peak_lr=1.0, warmup_steps=2, total_steps=12, min_lr_ratio=0.2)
        for s in range(13)
    ]
    assert full[8] > 0.2 and full[12] == pytest.approx(0.2)  # default: the floor at --steps
    cfg = SFTConfig(lr=1.0, total_steps=12, warmup_steps=2, min_lr_ratio=0.2, decay_steps=8)
    assert [cfg.lr_at(s) for s in range(13)] == held
    for bad in (1, 13):  # before the warmup ends, after the run ends
        with pytest.raises(ValueError, match="decay_steps"):
            SFTConfig(total_steps=12, warmup_steps=2, decay_steps=bad)


def test_config_rejects_bad_values_and_round_trips() -> None:
    cfg = SFTConfig(total_steps=100, warmup_fraction=0.1)
    assert cfg.warmup == 10
    assert SFTConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="ttt_steps"):
        SFTConfig(ttt_steps=0)
    with pytest.raises(ValueError, match="unknown"):
        SFTConfig.from_dict({"learning_rate": 1.0})


def test_sft_pipeline_mixes_in_prompts_the_target_writes_itself(
    tiny_target_dir: Path, tmp_path: Path
) -> None:
    """--self-prompts: the target writes N requests into <out>/self_prompts.jsonl (at
    --self-prompts-dtype), they alternate with the given prompts, the held-out tail draws on both,
    and a rerun reuses the file instead of sampling again."""
    lines = [{"id": f"u{i}", "prompt": f"The quick brown fox {i}"} for i in range(4)]
    run = _tiny_run(tiny_target_dir, tmp_path, lines, self_prompts=3, self_prompts_dtype="bfloat16")
    cfg = _config(
        total_steps=3, eval_every=0, checkpoint_every=0, draft_vocab_size=64,
        max_new_tokens=8, gen_batch_size=3,
    )  # fmt: skip
    result = sft_pipeline(run, cfg, progress=False)
    own = [json.loads(x) for x in (tmp_path / "run/self_prompts.jsonl").read_text().splitlines()]
    assert len(own) == 3
    assert all(r["provenance"]["dtype"] == "bfloat16" for r in own)
    assert result.num_train_prompts == 5
    assert result.heldout_ids == ("u2", "u3")  # own ones take the even places: s u s u s u u
    record = json.loads((tmp_path / "run/run.json").read_text())
    assert record["run"]["self_prompts"] == 3
    data = (tmp_path / "run/data").glob("shard-*.jsonl")
    ids = {json.loads(x)["prompt_id"] for shard in data for x in shard.read_text().splitlines()}
    assert ids == {r["id"] for r in own} | {"u0", "u1"}
    before = (tmp_path / "run/self_prompts.jsonl").stat().st_mtime_ns
    again = sft_pipeline(run, cfg, progress=False)
    assert again.step == 3 and again.regen.prompts == 0
    assert (tmp_path / "run/self_prompts.jsonl").stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="self_prompts must be >= 0"):
        replace(run, self_prompts=-1)
