"""A training run's state on disk, shared by SFT and Draft-OPD.

``<out_dir>/metrics.jsonl`` holds one line per step; ``<out_dir>/checkpoints/step-XXXXXXXX/`` holds
the drafter (safetensors, ``models.checkpoint``), the optimizer moments and RNG state
(``optimizer.safetensors``) and ``trainer_state.json`` (step, elapsed seconds, config). A checkpoint
is written to a temporary sibling and renamed, so a directory that exists is complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from draftopd.models.checkpoint import WEIGHTS_FILE, load_drafter, save_drafter
from draftopd.models.eagle3 import Eagle3Drafter
from draftopd.models.target import TargetModel

METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
STATE_FORMAT = 1
_STEP_DIR = re.compile(r"^step-(\d{8})$")
# fields that change neither the weights nor the data order, so a resume may change them


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under ``out_dir/checkpoints`` (None if there is none)."""
    root = Path(out_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return max(done, key=lambda p: p.name, default=None)


def save_training_checkpoint(
    directory: Path,
    drafter: Eagle3Drafter,
    optimizer: torch.optim.Optimizer,
    *,
    step: int,
    elapsed_s: float,
    extra: dict[str, Any],
    provenance: dict[str, Any],
) -> Path:
    """Write drafter + optimizer + trainer state to a temporary sibling, then rename it."""
    tmp = directory.with_name(f"{directory.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_drafter(drafter, tmp, provenance=provenance)
    state = optimizer.state_dict()
    tensors = {
        f"state.{index}.{key}": value.detach().cpu().contiguous()
        for index, slots in state["state"].items()
        for key, value in slots.items()
    }
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(tmp / OPTIMIZER_FILE))
    trainer_state = {
        "format": STATE_FORMAT,
        "step": step,
        "elapsed_s": elapsed_s,
        "param_groups": state["param_groups"],
        **extra,
    }
    (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2, sort_keys=True))
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)
    return directory


def load_training_state(directory: Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore optimizer moments and RNG from a checkpoint; return its trainer_state.json."""
    state = json.loads((directory / STATE_FILE).read_text())
    if state.get("format") != STATE_FORMAT:
        raise ValueError(
            f"{directory / STATE_FILE}: format {state.get('format')!r}, supported: {STATE_FORMAT}"
        )
    tensors = load_file(str(directory / OPTIMIZER_FILE))
    slots: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        kind, _, rest = name.partition(".")
        if kind == "state":
            index, _, key = rest.partition(".")
            slots.setdefault(int(index), {})[key] = value
    groups = [{**g, "betas": tuple(g["betas"])} for g in state["param_groups"]]
    optimizer.load_state_dict({"state": slots, "param_groups": groups})
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return state


def resume_drafter(directory: Path, target: TargetModel) -> Eagle3Drafter:
    """Load a checkpoint's drafter with its exact float32 weights (not cast to the target's)."""
    drafter = load_drafter(directory, target).float()
    tensors = load_file(str(directory / WEIGHTS_FILE), device=str(target.device))
    drafter.load_state_dict(tensors)
    return drafter


def truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint a run resumes from."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


__all__ = [
    "CHECKPOINT_DIR",
    "METRICS_FILE",
    "OPTIMIZER_FILE",
    "STATE_FILE",
    "latest_checkpoint",
    "load_training_state",
    "resume_drafter",
    "save_training_checkpoint",
    "truncate_metrics",
]
