"""SFT pipeline: training prompts in, a drafter checkpoint out (``draftopd train sft``).

One call of :func:`sft_pipeline` runs the whole SFT bootstrap (DRAFT_OPD.md, "SFT bootstrap"):

1. load the target;
2. load the training prompts (the built-in offline corpus, or the user's JSONL) and split off the
   held-out prompts: the *last* ``heldout`` prompts of the list, never trained on, used for tau
   during training (the built-in corpus is seed-shuffled, so they span its categories). They do
   not depend on ``limit``, which then keeps the first ``limit`` of the remaining prompts;
3. have the target answer the training prompts (``regenerate`` into ``<out_dir>/data``);
4. train the drafter with TTT (``train_sft`` into ``<out_dir>``: ``metrics.jsonl``,
   ``checkpoints/step-NNNNNNNN/``).

Both stages resume: a rerun generates only the prompts not yet answered and trains on from the
newest checkpoint; a rerun with a larger ``total_steps`` extends the run.
``<out_dir>/pipeline.json`` records the config of the latest call and
the held-out prompt ids. The ``draftopd train sft`` command and the trainer service's Celery task
both call :func:`sft_pipeline`; :func:`plot_training_curve` draws ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from draftopd.models.checkpoint import load_drafter
from draftopd.models.target import DEFAULT_TARGET, TargetModel, load_target
from draftopd.prompts import Prompt, render_prompt
from draftopd.training.config_dict import known_fields
from draftopd.training.configs import SFTConfig
from draftopd.training.corpus import load_training_prompts
from draftopd.training.data import MANIFEST, RegenStats, regenerate
from draftopd.training.run_state import latest_checkpoint
from draftopd.training.sft import train_sft

logger = logging.getLogger(__name__)

DATA_DIR = "data"
PIPELINE_FILE = "pipeline.json"
CURVE_AXES = ("step", "elapsed_s")


@dataclass(frozen=True)
class SFTPipelineConfig:
    out_dir: str  # run directory: data/, metrics.jsonl, checkpoints/, pipeline.json
    target: str = DEFAULT_TARGET  # target spec for load_target (name, directory or .gguf)
    prompts: str | None = None  # training prompts JSONL; None = the built-in offline corpus
    limit: int | None = None  # train on the first N non-held-out prompts; None = all
    skip: int = 0  # skip the first N non-held-out prompts (fresh data for a continued run)
    init_from: str | None = None  # start from this drafter checkpoint (continued SFT)
    heldout: int = 8  # prompts held out of training for tau (the last N of the list); 0 = none
    corpus_seed: int = 0  # seed of the built-in corpus (ignored with ``prompts``)
    max_new_tokens: int = 512  # cap on each target-written response
    gen_batch_size: int = 8  # prompts per batched ``generate`` call
    temperature: float = 0.0  # regeneration temperature; 0 = greedy
    top_p: float = 1.0  # nucleus cut-off when temperature > 0
    sft: SFTConfig = field(default_factory=SFTConfig)  # training hyperparameters
    device: str | None = None  # torch device; None = cuda when available, else cpu
    dtype: str = "float32"  # target dtype: float32 | bfloat16 | float16
    threads: int | None = None  # torch intra-op CPU threads; None = torch's default
    resume: bool = True  # continue the run in out_dir; False refuses a non-empty run directory
    progress: bool = True  # tqdm progress bars on stderr

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "gen_batch_size", "limit", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.heldout < 0 or self.skip < 0:
            raise ValueError(f"heldout and skip must be >= 0, got {self.heldout}, {self.skip}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(
                f"need temperature >= 0 and top_p in (0, 1]; got {self.temperature}, {self.top_p}"
            )

    @property
    def resolved_device(self) -> str:
        return self.device or ("cuda" if torch.cuda.is_available() else "cpu")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "sft": self.sft.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SFTPipelineConfig:
        values = known_fields(cls, data)
        if isinstance(values.get("sft"), dict):
            values["sft"] = SFTConfig.from_dict(values["sft"])
        return cls(**values)


@dataclass(frozen=True)
class SFTPipelineResult:
    checkpoint: Path  # the final checkpoint directory (loadable with ``load_drafter``)
    step: int  # optimizer steps completed
    tau: float | None  # held-out tau of the final drafter (None without held-out prompts)
    metrics_path: Path  # the training metrics JSONL
    data_dir: Path  # the regenerated samples
    regen: RegenStats  # what this call generated (zero prompts when the data was complete)
    resumed_from: int  # the training step this call started from (0 = fresh)
    num_train_prompts: int  # prompts the drafter is trained on
    heldout_ids: tuple[str, ...]  # ids of the held-out prompts


@dataclass(frozen=True)
class PromptSplit:
    """The training prompts and the held-out ones (disjoint)."""

    train: list[Prompt]  # regenerated and trained on
    heldout: list[Prompt]  # tau during training only


def split_prompts(
    prompts: Sequence[Prompt], *, heldout: int, limit: int | None, skip: int = 0
) -> PromptSplit:
    """Hold out the last ``heldout`` prompts, skip the first ``skip`` of the others (e.g. those an
    earlier stage trained on), then keep the next ``limit``."""
    if len(prompts) <= heldout:
        raise ValueError(
            f"{len(prompts)} prompts cannot spare {heldout} held-out ones and still train on "
            "some; lower heldout (--heldout) or give more prompts"
        )
    cut = len(prompts) - heldout
    if skip >= cut:
        raise ValueError(f"skip {skip} leaves none of the {cut} non-held-out prompts to train on")
    end = cut if limit is None else min(cut, skip + limit)
    return PromptSplit(train=list(prompts[skip:end]), heldout=list(prompts[cut:]))


def sft_pipeline(
    cfg: SFTPipelineConfig,
    *,
    on_shard: Callable[[Path], None] | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> SFTPipelineResult:
    """Regenerate SFT data with the target and train an EAGLE-3 drafter on it; resumable.

    ``on_shard`` (each committed data shard) and ``on_step`` (each training step's metrics line)
    report progress; an exception raised in either stops the run, and a rerun resumes it.
    """
    out = Path(cfg.out_dir)
    if not cfg.resume:
        _check_fresh(out)
    split = split_prompts(
        load_training_prompts(cfg.prompts, seed=cfg.corpus_seed),
        heldout=cfg.heldout,
        limit=cfg.limit,
        skip=cfg.skip,
    )
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)  # oversubscribed CPUs slow torch down many times
    target = load_target(cfg.target, device=cfg.resolved_device, dtype=cfg.dtype)
    out.mkdir(parents=True, exist_ok=True)
    _write_record(out, cfg, split)
    logger.info(
        "SFT on %d prompts (%d held out for tau) with target %s on %s",
        len(split.train), len(split.heldout), cfg.target, target.device,
    )  # fmt: skip
    with logging_redirect_tqdm():
        regen = _regenerate(target, split.train, out / DATA_DIR, cfg, on_shard)
        result = train_sft(
            target,
            out / DATA_DIR,
            out,
            cfg.sft,
            drafter=None if cfg.init_from is None else load_drafter(cfg.init_from, target),
            resume=cfg.resume,
            progress=cfg.progress,
            eval_prompts=[render_prompt(target.tokenizer, p) for p in split.heldout],
            on_step=on_step,
        )
    tau = "n/a (no held-out prompts)" if result.tau is None else f"{result.tau:.3f}"
    logger.info(
        "final checkpoint: %s (step %d); held-out tau %s", result.checkpoint, result.step, tau
    )
    return SFTPipelineResult(
        checkpoint=result.checkpoint,
        step=result.step,
        tau=result.tau,
        metrics_path=result.metrics_path,
        data_dir=out / DATA_DIR,
        regen=regen,
        resumed_from=result.resumed_from,
        num_train_prompts=len(split.train),
        heldout_ids=tuple(p.id for p in split.heldout),
    )


def _regenerate(
    target: TargetModel,
    prompts: list[Prompt],
    data_dir: Path,
    cfg: SFTPipelineConfig,
    on_shard: Callable[[Path], None] | None,
) -> RegenStats:
    return regenerate(
        target,
        prompts,
        data_dir,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.gen_batch_size,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        seed=cfg.sft.seed,  # sampled regeneration only
        progress=cfg.progress,
        on_shard=on_shard,
    )


def _check_fresh(out: Path) -> None:
    """With resume off, refuse a directory that already holds data or checkpoints."""
    if (out / DATA_DIR / MANIFEST).is_file() or latest_checkpoint(out) is not None:
        raise ValueError(
            f"{out} already holds an SFT run; resume it (drop --no-resume) or use a new out_dir"
        )


def _write_record(out: Path, cfg: SFTPipelineConfig, split: PromptSplit) -> None:
    """``pipeline.json``: this call's config and the held-out prompt ids (written atomically)."""
    record = {
        "config": cfg.to_dict(),
        "num_train_prompts": len(split.train),
        "heldout_ids": [p.id for p in split.heldout],
    }
    tmp = out / f"{PIPELINE_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / PIPELINE_FILE)


# -- training curve --------------------------------------------------------------------------------


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The lines of a training ``metrics.jsonl``."""
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


def plot_training_curve(metrics_path: str | Path, png_path: str | Path, *, x: str = "step") -> Path:
    """Held-out tau (left axis) and training loss (right axis) against ``x`` as a PNG.

    ``x`` is ``step`` or ``elapsed_s`` (optimizer-step seconds): DRAFT_OPD.md reports tau against
    both. Needs matplotlib (imported here; ImportError if it is not installed).
    """
    if x not in CURVE_AXES:
        raise ValueError(f"x axis {x!r} not supported; choose one of {CURVE_AXES}")
    lines = read_metrics(metrics_path)
    tau = [(r[x], r["tau"]) for r in lines if r.get("tau") is not None and r.get(x) is not None]
    loss = [(r[x], r["loss"]) for r in lines if r.get("loss") is not None and r.get(x) is not None]
    if not tau and not loss:
        raise ValueError(f"{metrics_path} has no tau or loss values to plot")
    from matplotlib.figure import Figure  # optional dependency: only this function needs it

    figure = Figure(figsize=(7, 4), layout="constrained")
    left = figure.add_subplot()
    left.set_xlabel("optimizer step" if x == "step" else "training seconds")
    left.set_ylabel("held-out tau (tokens per cycle)", color="tab:blue")
    if tau:
        left.plot(*zip(*tau, strict=True), marker="o", color="tab:blue", label="tau")
    right = left.twinx()
    right.set_ylabel("training loss", color="tab:orange")
    if loss:
        right.plot(*zip(*loss, strict=True), color="tab:orange", alpha=0.7, label="loss")
    left.set_zorder(right.get_zorder() + 1)  # tau drawn over the (denser) loss line
    left.patch.set_visible(False)
    left.set_title(f"SFT: {Path(metrics_path).parent.name or Path(metrics_path).name}")
    out = Path(png_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, format="png", dpi=120)
    return out


__all__ = [
    "PromptSplit",
    "SFTPipelineConfig",
    "SFTPipelineResult",
    "plot_training_curve",
    "read_metrics",
    "sft_pipeline",
    "split_prompts",
]
