"""`draftopd train sft` / `train curve` in-process: checkpoint out, resume, clear errors, a PNG."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from draftopd.cli import main
from draftopd.models.checkpoint import load_drafter
from draftopd.prompts import Prompt
from draftopd.training.configs import RunConfig, SFTConfig
from draftopd.training.data.corpus import split_prompts
from draftopd.training.data.regenerate import iter_samples

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TOPICS = ("the sea", "a fox", "lists", "primes", "the moon", "rivers", "trees", "a robot")


@pytest.fixture(autouse=True)
def _keep_torch_threads() -> Iterator[None]:
    """``--threads`` sets torch's process-wide thread count; give the next tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    rows = [
        {"id": f"p{i:02d}", "prompt": f"Write about {TOPICS[i % 8]}, take {i}."} for i in range(20)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _sft_argv(target: Path, prompts: Path, out: Path, *extra: str) -> list[str]:
    """A tiny, fast SFT run: 17 training prompts, 3 held out, 8-token responses."""
    return [
        "train", "sft", "--target", str(target), "--prompts", str(prompts), "--out", str(out),
        "--heldout", "3", "--max-new-tokens", "8", "--gen-batch-size", "6",
        "--batch-size", "4", "--max-seq-len", "64", "--ttt-steps", "2",
        "--draft-vocab-size", "64", "--eval-every", "0", "--eval-max-new-tokens", "8",
        "--threads", "1", "--no-progress", *extra,
    ]  # fmt: skip


def _metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _exit_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert isinstance(info.value.code, int)
    return info.value.code


def test_train_sft_writes_a_checkpoint_then_resumes_without_regenerating(
    tiny_target_dir: Path,
    tiny_target: Any,
    prompts_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    out = tmp_path / "run"
    assert main(_sft_argv(tiny_target_dir, prompts_file, out, "--steps", "2")) == 0

    first = out / "checkpoints" / "step-00000002"
    assert f"checkpoint: {first}\nstep: 2\ntau: " in capsys.readouterr().out
    assert load_drafter(first, tiny_target).cfg.draft_vocab_size == 64
    lines = _metrics(out)
    assert [x["step"] for x in lines] == [0, 1, 2]
    assert [x["step"] for x in lines if x["tau"] is not None] == [0, 2]  # start and end
    assert 1.0 <= lines[-1]["tau"] <= 6.0  # K = 5 drafts + 1 bonus per cycle at most
    assert f"final checkpoint: {first} (step 2); held-out tau {lines[-1]['tau']:.3f}" in caplog.text
    # the last 3 prompts are held out: never regenerated, never trained on
    trained = [s.prompt_id for s in iter_samples(out / "data")]
    assert trained == [f"p{i:02d}" for i in range(17)]
    record = json.loads((out / "run.json").read_text())
    assert record["heldout_ids"] == ["p17", "p18", "p19"] and record["num_train_prompts"] == 17

    shards = sorted((out / "data").glob("shard-*.jsonl"))
    mtimes = [p.stat().st_mtime_ns for p in shards]
    caplog.clear()
    assert main(_sft_argv(tiny_target_dir, prompts_file, out, "--steps", "4")) == 0

    assert [p.stat().st_mtime_ns for p in shards] == mtimes  # data reused, not regenerated
    assert sorted((out / "data").glob("shard-*.jsonl")) == shards
    assert "RegenStats(prompts=0, skipped=17" in caplog.text
    assert "resumed SFT at step 2" in caplog.text
    resumed = _metrics(out)
    assert resumed[:3] == lines  # the first run's lines are kept, the run continues after them
    assert [x["step"] for x in resumed] == [0, 1, 2, 3, 4] and resumed[-1]["tau"] is not None
    final = out / "checkpoints" / "step-00000004"
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["config"]["total_steps"] == 4
    assert load_drafter(final, tiny_target).cfg.draft_vocab_size == 64

    # refusals name the problem: a fresh run over an old one, steps below the saved step
    assert _exit_code(_sft_argv(tiny_target_dir, prompts_file, out, "--no-resume")) == 2
    assert "already holds an SFT run" in capsys.readouterr().err
    assert _exit_code(_sft_argv(tiny_target_dir, prompts_file, out, "--steps", "3")) == 2
    assert "total_steps 3 is below its step 4" in capsys.readouterr().err
    assert (
        _exit_code(_sft_argv(tiny_target_dir, prompts_file, out, "--steps", "4", "--lr", "1")) == 2
    )
    assert "['lr'] differ" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--steps", "0"], "total_steps must be >= 1, got 0 [--steps]"),
        (["--steps", "ten"], "argument --steps: expected an integer, got 'ten'"),
        (["--lr", "0"], "need lr > 0"),
        (["--temperature", "-0.5"], "need temperature >= 0"),
        (["--heldout", "-1"], "heldout must be >= 0, got -1 [--heldout]"),
        (["--dtype", "int8"], "argument --dtype: invalid choice"),
        (["--warmup", "9", "--steps", "5"], "warmup_steps must be in [0, 5]"),
        (["--heldout", "20"], "20 prompts cannot spare 20 held-out ones"),
    ],
)
def test_bad_flags_exit_2_with_a_message(
    flags: list[str],
    message: str,
    prompts_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "run"
    # the target path is never reached: every error comes before the target loads
    argv = _sft_argv(tmp_path / "no-target", prompts_file, out, *flags)
    assert _exit_code(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "draftopd train" in err
    assert not (out / "data").exists()


def test_train_sft_requires_out(capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_code(["train", "sft", "--steps", "3"]) == 2
    assert "the following arguments are required: --out" in capsys.readouterr().err


def test_split_holds_out_the_last_prompts_whatever_the_limit() -> None:
    prompts = [Prompt(id=str(i), messages=None, text=f"t{i}", source="prompt") for i in range(10)]
    split = split_prompts(prompts, heldout=3, limit=None)
    assert [p.id for p in split.train] == [str(i) for i in range(7)]
    assert [p.id for p in split.heldout] == ["7", "8", "9"]
    limited = split_prompts(prompts, heldout=3, limit=4)
    assert [p.id for p in limited.train] == ["0", "1", "2", "3"]
    assert limited.heldout == split.heldout
    assert split_prompts(prompts, heldout=0, limit=None).heldout == []
    with pytest.raises(ValueError, match="cannot spare"):
        split_prompts(prompts, heldout=10, limit=None)


def test_run_and_sft_sections_round_trip_through_json() -> None:
    run = RunConfig(out_dir="runs/a", limit=100)
    sft = SFTConfig(total_steps=50, lr=1e-3)
    assert RunConfig.from_dict(json.loads(json.dumps(run.to_dict()))) == run
    assert SFTConfig.from_dict(json.loads(json.dumps(sft.to_dict()))) == sft
    with pytest.raises(ValueError, match=r"unknown RunConfig fields: \['steps'\]"):
        RunConfig.from_dict({"out_dir": "runs/a", "steps": 5})
    with pytest.raises(ValueError, match="gen_batch_size"):
        SFTConfig(gen_batch_size=0)


def test_every_config_field_has_a_flag_with_its_help_and_default(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The flags are generated from the config fields: none is declared twice."""
    with pytest.raises(SystemExit):
        main(["train", "opd", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in (
        "--out",
        "--drafter",
        "--steps",
        "--lambda-b",
        "--clip",
        "--logprob-floor",
        "--rollout-mode",
        "--random-anchors",
        "--corpus-seed",
        "--eval-draft-tokens",
    ):
        assert flag in text
    assert "stream B weight (rejected slots); 0 = off (default 1.0)" in text
    assert "--requests-per-step" not in text  # a trainer-service setting: no flag


def _write_metrics(path: Path, *, final_tau: float = 3.0, lr_floor: float = 0.2) -> Path:
    """20 steps; tau rises to 3.0 at step 10, then stays there (or moves to ``final_tau``)."""
    rows = [{"step": 0, "loss": None, "tau": 1.0, "elapsed_s": 0.0}]
    for s in range(1, 21):
        tau = None
        if s % 5 == 0:
            tau = 1.0 + s / 5 if s <= 10 else (3.0 if s < 20 else final_tau)
        lr = 1e-3 * max(lr_floor, min(1.0, 1.05 - s / 20))
        rows.append(
            {
                "step": s,
                "loss": 8.0 - s / 5,
                "step_loss": [8.0 - s / 5, 9.0 - s / 5],
                "step_acc": [s / 40, s / 50],
                "lr": lr,
                "tau": tau,
                "elapsed_s": s,
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_train_curve_writes_a_png_and_the_plateau_verdict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    metrics = _write_metrics(tmp_path / "metrics.jsonl")
    png = tmp_path / "plots" / "curve.png"
    assert main(["train", "curve", str(metrics), "--png", str(png), "--smooth", "3"]) == 0
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000
    out = capsys.readouterr().out
    assert "plateau reached: held-out tau 3.000 at step 15 -> 3.000" in out
    assert "lowest LR 20.0% of the peak" in out
    # tau still rising by 5% over the last quarter, or an LR decayed below 10%: no plateau
    assert main(["train", "curve", str(_write_metrics(metrics, final_tau=3.15))]) == 0
    assert "no plateau" in capsys.readouterr().out
    assert main(["train", "curve", str(_write_metrics(metrics, lr_floor=0.05))]) == 0
    assert "no plateau" in capsys.readouterr().out


def test_train_curve_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    png = tmp_path / "curve.png"
    assert _exit_code(["train", "curve", str(tmp_path / "missing.jsonl"), "--png", str(png)]) == 2
    assert "metrics file not found" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"step": 0, "loss": None, "tau": None}) + "\n")
    assert _exit_code(["train", "curve", str(empty), "--png", str(png)]) == 2
    assert "no tau or loss values" in capsys.readouterr().err
    metrics = _write_metrics(tmp_path / "metrics.jsonl")
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if not installed
    assert _exit_code(["train", "curve", str(metrics), "--png", str(png)]) == 1
    assert "pip install matplotlib" in capsys.readouterr().err
    assert not png.exists()


def test_split_skip_passes_over_the_first_prompts() -> None:
    prompts = [Prompt(id=str(i), messages=None, text=f"t{i}", source="prompt") for i in range(10)]
    split = split_prompts(prompts, heldout=3, limit=2, skip=4)
    assert [p.id for p in split.train] == ["4", "5"] and [p.id for p in split.heldout] == [
        "7",
        "8",
        "9",
    ]
    assert [p.id for p in split_prompts(prompts, heldout=3, limit=None, skip=5).train] == ["5", "6"]
    with pytest.raises(ValueError, match="skip 7 leaves none"):
        split_prompts(prompts, heldout=3, limit=None, skip=7)


def test_continued_sft_and_train_opd_start_from_the_sft_checkpoint(
    tiny_target_dir: Path,
    tiny_target: Any,
    prompts_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The two arms of the SFT-vs-OPD comparison, from one checkpoint and on fresh prompts."""
    sft = tmp_path / "sft"
    assert main(_sft_argv(tiny_target_dir, prompts_file, sft, "--limit", "8", "--steps", "2")) == 0
    start = sft / "checkpoints" / "step-00000002"
    capsys.readouterr()

    more = tmp_path / "more-sft"
    argv = _sft_argv(tiny_target_dir, prompts_file, more, "--steps", "2", "--skip", "8")
    assert main([*argv, "--init-from", str(start)]) == 0
    trained = [s.prompt_id for s in iter_samples(more / "data")]
    assert trained == [f"p{i:02d}" for i in range(8, 17)]  # fresh prompts only
    assert torch.equal(
        load_drafter(more / "checkpoints/step-00000002", tiny_target).d2t,
        load_drafter(start, tiny_target).d2t,
    )  # continued from the checkpoint: its draft vocabulary is kept

    opd = tmp_path / "opd"
    opd_argv = [
        "train", "opd", "--target", str(tiny_target_dir), "--prompts", str(prompts_file),
        "--drafter", str(start), "--out", str(opd), "--skip", "8", "--heldout", "3",
        "--steps", "2", "--prompts-per-step", "2", "--num-draft-tokens", "3",
        "--max-new-tokens", "8", "--eval-every", "0", "--eval-max-new-tokens", "8",
        "--lambda-b", "0.5", "--rollout-mode", "batched", "--threads", "1", "--no-progress",
    ]  # fmt: skip
    assert main(opd_argv) == 0
    assert (
        f"checkpoint: {opd / 'checkpoints' / 'step-00000002'}\nstep: 2" in capsys.readouterr().out
    )
    lines = _metrics(opd)
    assert [x["step"] for x in lines] == [0, 1, 2] and lines[-1]["tau"] is not None
    assert lines[1]["parity_rejected"] in (None, 1.0) or lines[1]["parity_rejected"] >= 0.99
    run = json.loads((opd / "run.json").read_text())
    assert run["kind"] == "draft_opd" and run["draft_opd"]["loss"]["lambda_b"] == 0.5
    assert run["num_train_prompts"] == 9
    assert run["heldout_ids"] == ["p17", "p18", "p19"]

    assert _exit_code([*opd_argv, "--stream-b-loss", "mse"]) == 2
    assert "argument --stream-b-loss: invalid choice: 'mse'" in capsys.readouterr().err
    assert _exit_code(["train", "opd", "--out", str(opd), "--drafter", str(tmp_path / "nope")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert _exit_code([*opd_argv, "--temperature", "0.7"]) == 2
    assert "batched rollouts are greedy only" in capsys.readouterr().err

    tau_argv = [
        "train", "tau", "--run", f"opd={opd}", "--run", f"sft={more}", "--init", str(start),
        "--target", str(tiny_target_dir), "--prompts", str(prompts_file), "--limit", "3",
        "--max-new-tokens", "8", "--num-draft-tokens", "3", "--json", str(tmp_path / "t.json"),
    ]  # fmt: skip
    assert main(tau_argv) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[:2] for line in printed] == [
        [run, f"step {step}"] for run in ("opd", "sft") for step in (0, 2)
    ]
    scored = json.loads((tmp_path / "t.json").read_text())
    assert scored["opd"][0]["tau"] == scored["sft"][0]["tau"]  # both start at the same checkpoint
    assert scored["sft"][1]["elapsed_s"] > _metrics(more)[-1]["elapsed_s"]  # data time included
    png = tmp_path / "tau.png"
    compare = ["train", "compare", "--png", str(png), "--run", f"opd={opd / 'tau_eval.jsonl'}"]
    assert main([*compare, "--run", f"sft={more / 'tau_eval.jsonl'}"]) == 0
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_train_compare_draws_both_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _write_metrics(tmp_path / "a.jsonl")
    b = _write_metrics(tmp_path / "b.jsonl")
    png = tmp_path / "compare.png"
    assert (
        main(["train", "compare", "--run", f"opd={a}", "--run", f"sft={b}", "--png", str(png)]) == 0
    )
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert _exit_code(["train", "compare", "--run", "nolabel", "--png", str(png)]) == 2
    assert "expected LABEL=METRICS_JSONL" in capsys.readouterr().err
    no_tau = tmp_path / "c.jsonl"
    no_tau.write_text(json.dumps({"step": 1, "loss": 2.0, "tau": None}) + "\n")
    assert _exit_code(["train", "compare", "--run", f"x={no_tau}", "--png", str(png)]) == 2
    assert "no tau values in the metrics of ['x']" in capsys.readouterr().err


def test_train_compare_groups_seeds_and_draws_the_base(tmp_path: Path) -> None:
    seeds = [_write_metrics(tmp_path / f"opd-s{i}.jsonl") for i in range(3)]
    base = _write_metrics(tmp_path / "base.jsonl")
    png = tmp_path / "plateau.png"
    argv = ["train", "compare", "--png", str(png), "--base", f"sft={base}", "--title", "EAGLE-3"]
    assert main([*argv, *[f"--run=opd={p}" for p in seeds]]) == 0
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_train_prompts_writes_self_instruct_prompts(
    tiny_target_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "self.jsonl"
    argv = ["train", "prompts", "--target", str(tiny_target_dir), "--out", str(out)]
    assert main([*argv, "--count", "3", "--batch-size", "4", "--max-new-tokens", "64"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["kept"] == 3 and len(out.read_text().splitlines()) == 3
    with pytest.raises(SystemExit) as refused:
        main([*argv, "--count", "3", "--temperature", "0"])
    assert refused.value.code == 1 and "temperature" in capsys.readouterr().err
