"""The run scaffold that SFT and Draft-OPD share: a training run's state on disk and its loop.

``<out_dir>`` holds:

    run.json                        the run record: kind, run section, stage config, prompt split
    metrics.jsonl                   one JSON line per step (step, tau on eval steps, elapsed_s, ...)
    checkpoints/step-XXXXXXXX/      the drafter (safetensors, ``models.checkpoint``), the optimizer
                                    moments and RNG state (``optimizer.safetensors``) and
                                    ``trainer_state.json`` (step, elapsed seconds, config)

A checkpoint is written to a temporary sibling and renamed, so a directory that exists is
complete. ``TrainingRun`` is the loop's bookkeeping: the step counter, the metrics log, held-out
tau and checkpoints on schedule, and the resume rules (``open_run``): a rerun continues from the
newest checkpoint, and refuses a config that would change the trajectory.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from draftopd.models.checkpoint import WEIGHTS_FILE, load_drafter, save_drafter
from draftopd.models.drafter import Drafter
from draftopd.models.target import TargetModel
from draftopd.speculative.engine import DecodeEngine
from draftopd.speculative.sampling import SamplingParams

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
RUN_RECORD_FILE = "run.json"
STATE_FORMAT = 1
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under ``out_dir/checkpoints`` (None if there is none)."""
    root = Path(out_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return max(done, key=lambda p: p.name, default=None)


def save_training_checkpoint(
    directory: Path,
    drafter: Drafter,
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


def resume_drafter(directory: Path, target: TargetModel) -> Drafter:
    """Load a checkpoint's drafter with its exact float32 weights (not cast to the target's)."""
    drafter = load_drafter(directory, target).float()
    tensors = load_file(str(directory / WEIGHTS_FILE), device=str(target.device))
    drafter.load_state_dict(tensors)
    return drafter


def run_checkpoints(run_dir: str | Path) -> list[tuple[int, float, Path]]:
    """(step, elapsed_s, directory) of every complete checkpoint of a run, by step."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        raise ValueError(f"{run_dir} has no {CHECKPOINT_DIR}/ directory")
    found = []
    for path in sorted(root.glob("step-*")):
        state_file = path / STATE_FILE
        if path.is_dir() and state_file.is_file():
            state = json.loads(state_file.read_text())
            found.append((int(state["step"]), float(state["elapsed_s"]), path))
    if not found:
        raise ValueError(f"{run_dir} has no complete checkpoint")
    return found


def heldout_tau(
    target: TargetModel,
    drafter: Drafter,
    prompts: Sequence[Sequence[int]],
    *,
    num_draft_tokens: int,
    max_new_tokens: int,
) -> float:
    """Acceptance length of real greedy speculative decoding: committed tokens / cycles."""
    engine = DecodeEngine(target, num_draft_tokens=num_draft_tokens)
    params = SamplingParams(max_new_tokens=max_new_tokens)
    committed = cycles = 0
    was_training = drafter.training
    drafter.eval()
    try:
        for ids in prompts:
            result = engine.generate(
                list(ids), params, proposer=drafter.proposer(weights="float32"), decode_text=False
            )
            committed += result.stats.committed
            cycles += result.stats.cycles
    finally:
        drafter.train(was_training)
    return committed / cycles if cycles else 0.0


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The lines of a training ``metrics.jsonl`` (the one reader of that file)."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"metrics file not found: {file}")
    lines = []
    for line_no, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{file}: line {line_no} is not JSON ({err.msg})") from err
        if not isinstance(record, dict) or "step" not in record:
            raise ValueError(f"{file}: line {line_no} is not a metrics record (no 'step')")
        lines.append(record)
    return lines


def truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint a run resumes from."""
    if not path.is_file():
        return
    kept = [line for line in read_metrics(path) if line["step"] <= step]
    path.write_text("".join(json.dumps(line) + "\n" for line in kept), encoding="utf-8")


def write_run_record(out_dir: Path, record: dict[str, Any]) -> Path:
    """``run.json``: what this call ran with (written atomically; the latest call wins)."""
    path = out_dir / RUN_RECORD_FILE
    tmp = out_dir / f"{RUN_RECORD_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def every(step: int, period: int) -> bool:
    """Whether a schedule with this period fires after ``step`` steps (0 = never)."""
    return period > 0 and step % period == 0


def check_resume(saved: dict[str, Any], cfg: Any, where: Path, *, extendable: bool) -> None:
    """Refuse to resume with another trajectory: config fields that differ from the checkpoint's,
    except the config class's resumable ones. With ``extendable``, ``total_steps`` may grow (the
    learning rate then follows the schedule of the new length from the saved step on)."""
    before = type(cfg).from_dict(saved["config"]).to_dict()  # earlier layouts normalised
    current = cfg.to_dict()
    resumable = type(cfg).resumable_fields()
    changed = sorted(k for k in current if k not in resumable and before.get(k) != current[k])
    step = int(saved["step"])
    if extendable and changed == ["total_steps"] and cfg.total_steps >= step:
        logger.info("extending the run from %s to %d total steps at step %d",
                    before["total_steps"], cfg.total_steps, step)  # fmt: skip
        return
    if extendable and changed == ["total_steps"]:
        raise ValueError(
            f"cannot resume {where}: total_steps {cfg.total_steps} is below its step {step}; "
            f"pass at least {step} or use a new out_dir"
        )
    if changed:
        grow = ", and total_steps may grow" if extendable else ""
        raise ValueError(
            f"cannot resume {where}: config fields {changed} differ from the checkpoint's "
            f"(only {sorted(resumable)} may change{grow}); use a new out_dir"
        )


@dataclass
class TrainingRun:
    """The bookkeeping of one training call: step, time, metrics log, tau and checkpoints."""

    out_dir: Path
    target: TargetModel
    drafter: Drafter
    optimizer: torch.optim.Optimizer
    cfg: Any  # SFTConfig or OPDConfig: total_steps, eval_* and checkpoint_every are read
    eval_prompts: Sequence[Sequence[int]] = ()
    on_step: Callable[[dict[str, Any]], None] | None = None
    step: int = 0
    elapsed_s: float = 0.0  # training time only (held-out evaluation excluded)
    tau: float | None = None
    resumed_from: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    acceptance: list[float] | None = None  # of the latest cached eval, by draft position
    evaluator: Any = None  # GreedyTauEvaluator, built at the first cached eval (or handed in)

    @property
    def done(self) -> bool:
        budget = getattr(self.cfg, "max_seconds", None)
        out_of_time = budget is not None and self.elapsed_s >= budget
        return self.step >= self.cfg.total_steps or out_of_time

    def evaluate(self) -> float | None:
        """Held-out tau of the current drafter (None without held-out prompts)."""
        if not self.eval_prompts:
            return None
        if getattr(self.cfg, "eval_mode", "engine") == "cached":
            from draftopd.training.tau_eval import GreedyTauEvaluator  # it imports this module

            if self.evaluator is None:
                self.evaluator = GreedyTauEvaluator(
                    self.target,
                    self.eval_prompts,
                    num_draft_tokens=self.cfg.eval_num_draft_tokens,
                    max_new_tokens=self.cfg.eval_max_new_tokens,
                )
            result = self.evaluator.evaluate(self.drafter)
            self.tau = result.tau
            self.acceptance = [round(a, 4) for a in result.acceptance_by_position]
            return self.tau
        self.tau = heldout_tau(
            self.target,
            self.drafter,
            self.eval_prompts,
            num_draft_tokens=self.cfg.eval_num_draft_tokens,
            max_new_tokens=self.cfg.eval_max_new_tokens,
        )
        return self.tau

    def log(self, record: dict[str, Any]) -> dict[str, Any]:
        """Append a metrics line for the current step and report it to ``on_step``."""
        line = {"step": self.step, "tau": None, **record, "elapsed_s": round(self.elapsed_s, 4)}
        with (self.out_dir / METRICS_FILE).open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(line) + "\n")
        self.history.append(line)
        if self.on_step is not None:
            self.on_step(line)
        return line

    def start(self, *, always: bool = False) -> None:
        """The starting point of the tau curve on a fresh run: a step-0 line with held-out tau
        (``always``: also without held-out prompts, tau None)."""
        if self.step == 0 and (self.eval_prompts or always):
            tau = self.evaluate()
            extra = {} if self.acceptance is None else {"acceptance": self.acceptance}
            self.log({"tau": tau, **extra})

    def finish_step(
        self, stats: dict[str, Any], *, extra: dict[str, Any], provenance: dict[str, Any]
    ) -> bool:
        """After an optimizer step: tau if due, the metrics line, a checkpoint if due (the
        drafter with ``provenance`` and the step in its config.json; the optimizer; ``extra`` in
        its trainer state). True when checkpointed."""
        cfg, last = self.cfg, self.done
        if last or every(self.step, cfg.eval_every):
            stats = {**stats, "tau": self.evaluate()}
            if self.acceptance is not None:
                stats["acceptance"] = self.acceptance
        self.log(stats)
        if not (last or every(self.step, cfg.checkpoint_every)):
            return False
        config = cfg.to_dict()
        save_training_checkpoint(
            self.out_dir / CHECKPOINT_DIR / f"step-{self.step:08d}",
            self.drafter,
            self.optimizer,
            step=self.step,
            elapsed_s=self.elapsed_s,
            extra={"config": config, **extra},
            provenance={**provenance, "step": self.step},
        )
        return True

    @property
    def checkpoint(self) -> Path:
        latest = latest_checkpoint(self.out_dir)
        if latest is None:
            raise ValueError(f"{self.out_dir} has no checkpoint yet")
        return latest


def open_run(
    out_dir: Path,
    target: TargetModel,
    cfg: Any,
    *,
    resume: bool,
    label: str,
    fresh_drafter: Callable[[], Drafter],
    make_optimizer: Callable[[Drafter], torch.optim.Optimizer],
    check_saved: Callable[[dict[str, Any], Path], None],
    eval_prompts: Sequence[Sequence[int]] = (),
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> TrainingRun:
    """A fresh run in ``out_dir``, or the newest checkpoint there resumed (``resume``): its exact
    float32 weights, optimizer moments, RNG state, step and time. ``check_saved`` refuses a
    checkpoint the current call cannot continue (it gets trainer_state.json). ``label`` names
    the kind of run in the log."""
    out_dir.mkdir(parents=True, exist_ok=True)
    latest = latest_checkpoint(out_dir)
    if latest is not None and not resume:
        raise ValueError(f"{out_dir} holds checkpoints of an earlier run; resume or use a new dir")
    if latest is None:
        (out_dir / METRICS_FILE).unlink(missing_ok=True)  # died before its first checkpoint
        drafter = fresh_drafter().float().train()
        return TrainingRun(out_dir, target, drafter, make_optimizer(drafter), cfg,
                           eval_prompts, on_step)  # fmt: skip
    check_saved(json.loads((latest / STATE_FILE).read_text()), latest)
    drafter = resume_drafter(latest, target).train()
    run = TrainingRun(out_dir, target, drafter, make_optimizer(drafter), cfg, eval_prompts, on_step)
    state = load_training_state(latest, run.optimizer)
    run.step, run.elapsed_s = int(state["step"]), float(state["elapsed_s"])
    run.resumed_from = run.step
    truncate_metrics(out_dir / METRICS_FILE, run.step)
    logger.info("resumed %s at step %d from %s", label, run.step, latest)
    return run


__all__ = [
    "CHECKPOINT_DIR",
    "METRICS_FILE",
    "OPTIMIZER_FILE",
    "RUN_RECORD_FILE",
    "STATE_FILE",
    "TrainingRun",
    "check_resume",
    "every",
    "heldout_tau",
    "latest_checkpoint",
    "load_training_state",
    "open_run",
    "read_metrics",
    "resume_drafter",
    "run_checkpoints",
    "save_training_checkpoint",
    "truncate_metrics",
    "write_run_record",
]
