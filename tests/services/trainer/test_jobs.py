"""Train-job specs (what POST /train-jobs will carry) and running an `sft` job with its status."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from pydantic import ValidationError

from draftopd.wire.job_specs import DraftOPDJobSpec, SFTJobSpec, parse_spec
from services.trainer.jobs import run_train_job
from services.trainer.rollouts import JobStatus


def test_specs_are_validated_strictly() -> None:
    sft = parse_spec({"mode": "sft", "out_dir": "runs/a", "sft": {"total_steps": 5}})
    assert isinstance(sft, SFTJobSpec) and sft.sft.total_steps == 5
    opd = parse_spec({"mode": "draft_opd", "out_dir": "o", "drafter": "d", "opd": {"lr": 1e-4}})
    assert isinstance(opd, DraftOPDJobSpec) and opd.opd.lr == 1e-4
    with pytest.raises(ValidationError, match="steps"):
        parse_spec({"mode": "sft", "out_dir": "a", "steps": 5})  # extra="forbid"
    with pytest.raises(ValidationError, match=r"opd\.lrr"):
        parse_spec({"mode": "draft_opd", "out_dir": "o", "drafter": "d", "opd": {"lrr": 1}})
    with pytest.raises(ValidationError, match="mode"):
        parse_spec({"mode": "medusa", "out_dir": "a"})
    with pytest.raises(ValidationError, match="drafter"):
        parse_spec({"mode": "draft_opd", "out_dir": "a"})


def test_specs_and_configs_validate_without_torch() -> None:
    """The registry validates specs in a torch-free image: importing them must not pull torch."""
    code = (
        "import sys; from draftopd.wire.job_specs import parse_spec; "
        "spec = parse_spec({'mode': 'draft_opd', 'out_dir': 'o', 'drafter': 'd', "
        "'opd': {'rollout_mode': 'batched', 'total_steps': 3}}); "
        "assert 'torch' not in sys.modules, 'torch was imported'; "
        "print(spec.opd.rollout_mode, spec.opd.total_steps, spec.opd.lr)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["batched", "3", "0.0003"]


def test_an_sft_job_reports_progress_and_success(
    redis_url: str, tiny_target_dir: Path, tmp_path: Path
) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {i}."}) + "\n" for i in range(8)))
    spec = {
        "mode": "sft",
        "out_dir": str(tmp_path / "run"),
        "target": str(tiny_target_dir),
        "prompts": str(prompts),
        "heldout": 2,
        "max_new_tokens": 8,
        "threads": 1,
        "sft": {
            "total_steps": 3,
            "batch_size": 2,
            "ttt_steps": 2,
            "draft_vocab_size": 64,
            "eval_every": 0,
            "eval_max_new_tokens": 8,
        },
    }
    client = redis.Redis.from_url(redis_url)
    seen: list[int] = []
    result = run_train_job("j1", spec, client, on_step=lambda line: seen.append(line["step"]))
    assert result["status"] == "succeeded" and result["step"] == 3
    assert Path(result["checkpoint"]).name == "step-00000003"
    assert seen == [0, 1, 2, 3]
    status = JobStatus(client).get("j1")
    assert status["status"] == "succeeded" and status["progress"] == 1.0 and status["mode"] == "sft"

    with pytest.raises(ValueError):
        run_train_job("j2", {**spec, "target": str(tmp_path / "missing")}, client)
    failed = JobStatus(client).get("j2")
    assert failed["status"] == "failed" and "missing" in failed["error"]
