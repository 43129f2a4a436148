"""SFT bootstrap of an EAGLE-3 drafter (DRAFT_OPD.md, "SFT bootstrap").

The drafter learns from target-regenerated samples with training-time test (``ttt.py``): 7
unrolled draft steps weighted 0.8^j, soft cross-entropy to the target distribution over the draft
vocabulary. The draft vocabulary is the Vd most frequent target ids in the responses. AdamW with
linear warmup and a cosine decay, global gradient clipping. The target, and with it the shared
embedding, stays frozen.

``out_dir`` layout::

    metrics.jsonl                  one JSON line per step: step, loss, step_loss, step_acc, tau
                                   (eval steps only; step 0 is the initial drafter), lr, grad_norm,
                                   elapsed_s (cumulative optimizer-step time, evaluation excluded)
    checkpoints/step-00000050/     config.json + model.safetensors (a ``load_drafter`` directory),
                                   optimizer.safetensors (AdamW moments + RNG state) and
                                   trainer_state.json (step, elapsed_s, config, param groups,
                                   a sha256 of the training samples)

Everything is safetensors or JSON; nothing is pickled. A rerun with ``resume=True`` continues
from the newest complete checkpoint: data order and learning rate are pure functions of the step,
so an interrupted run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from draftopd.models.checkpoint import (
    check_compatible,
    random_drafter_for,
)
from draftopd.models.eagle3 import Eagle3Drafter
from draftopd.models.target import TargetModel, load_target
from draftopd.prompts import load_prompts, render_prompt
from draftopd.speculative.engine import DecodeEngine
from draftopd.speculative.proposers import Eagle3Proposer
from draftopd.speculative.sampling import SamplingParams
from draftopd.training.configs import SFTConfig
from draftopd.training.data import Sample, collate, iter_samples, target_features
from draftopd.training.run_state import (
    CHECKPOINT_DIR,
    METRICS_FILE,
    STATE_FILE,
    latest_checkpoint,
    load_training_state,
    resume_drafter,
    save_training_checkpoint,
    truncate_metrics,
)
from draftopd.training.schedule import make_adamw
from draftopd.training.ttt import ttt_unroll

logger = logging.getLogger(__name__)

_RESUMABLE_CHANGES = frozenset(
    {"eval_every", "eval_num_draft_tokens", "eval_max_new_tokens", "checkpoint_every"}
)


@dataclass(frozen=True)
class SFTResult:
    drafter: Eagle3Drafter  # the trained drafter (float32, on the target's device)
    step: int  # optimizer steps completed
    checkpoint: Path  # newest checkpoint directory (loadable with ``load_drafter``)
    metrics_path: Path  # the JSONL metrics log
    resumed_from: int  # the step this call started from (0 = fresh)
    tau: float | None  # the latest held-out tau (None without eval prompts)
    history: list[dict[str, Any]] = field(default_factory=list)  # lines this call logged


# -- data ------------------------------------------------------------------------------------------


def choose_draft_vocab(
    samples: Iterable[Sample], *, vocab_size: int, draft_vocab_size: int
) -> torch.Tensor:
    """The ``draft_vocab_size`` target ids most frequent in the responses, sorted by id.

    Ties (including never-seen ids) go to the lower id."""
    if not 0 < draft_vocab_size <= vocab_size:
        raise ValueError(f"draft_vocab_size {draft_vocab_size} must be in [1, {vocab_size}]")
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for sample in samples:
        ids = torch.tensor(sample.response_ids, dtype=torch.long)
        counts += torch.bincount(ids, minlength=vocab_size)
    order = torch.sort(counts, descending=True, stable=True).indices
    return order[:draft_vocab_size].sort().values


def batch_indices(step: int, *, num_samples: int, batch_size: int, seed: int) -> list[int]:
    """Sample indices of the batch at ``step``: consecutive slices of per-epoch permutations."""
    indices = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(k, num_samples)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        indices.append(int(torch.randperm(num_samples, generator=generator)[offset]))
    return indices


def _load_samples(data: str | Path | Iterable[Sample]) -> list[Sample]:
    samples = list(iter_samples(data)) if isinstance(data, (str, Path)) else list(data)
    samples = [s for s in samples if s.response_ids]
    if not samples:
        raise ValueError("no training samples with a non-empty response")
    return samples


# -- evaluation ------------------------------------------------------------------------------------


def heldout_tau(
    target: TargetModel,
    drafter: Eagle3Drafter,
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
                list(ids), params, proposer=Eagle3Proposer(drafter), decode_text=False
            )
            committed += result.stats.committed
            cycles += result.stats.cycles
    finally:
        drafter.train(was_training)
    return committed / cycles if cycles else 0.0


# -- checkpoints -----------------------------------------------------------------------------------


def _check_resume(saved: dict[str, Any], cfg: SFTConfig, fingerprint: str, where: Path) -> None:
    """Refuse to resume with another trajectory: changed config fields or other data.

    ``total_steps`` may grow (a run extended with a larger ``--steps``): from the saved step on,
    the learning rate follows the warmup + cosine schedule of the new length."""
    current = cfg.to_dict()
    changed = sorted(
        k for k in current if k not in _RESUMABLE_CHANGES and saved["config"].get(k) != current[k]
    )
    if changed == ["total_steps"] and cfg.total_steps >= int(saved["step"]):
        logger.info(
            "extending the run from %s to %d total steps at step %s",
            saved["config"]["total_steps"], cfg.total_steps, saved["step"],
        )  # fmt: skip
        return
    if changed == ["total_steps"]:
        raise ValueError(
            f"cannot resume {where}: total_steps {cfg.total_steps} is below its step "
            f"{saved['step']}; pass at least {saved['step']} or use a new out_dir"
        )
    if changed:
        raise ValueError(
            f"cannot resume {where}: config fields {changed} differ from the checkpoint's "
            f"(only {sorted(_RESUMABLE_CHANGES)} may change, and total_steps may grow); "
            "use a new out_dir"
        )
    if saved.get("data_fingerprint") != fingerprint:
        raise ValueError(f"cannot resume {where}: the training samples differ from that run's")


# -- training --------------------------------------------------------------------------------------


def _make_optimizer(drafter: Eagle3Drafter, cfg: SFTConfig) -> torch.optim.AdamW:
    return make_adamw(drafter, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def _initial_drafter(
    target: TargetModel, samples: list[Sample], cfg: SFTConfig, drafter: Eagle3Drafter | None
) -> Eagle3Drafter:
    if drafter is not None:  # e.g. continued SFT from a checkpoint: keep its draft vocabulary
        check_compatible(drafter.cfg, target)
        return drafter
    size = min(cfg.draft_vocab_size, target.vocab_size)
    drafter = random_drafter_for(target, seed=cfg.seed, draft_vocab_size=size)
    vocab = choose_draft_vocab(samples, vocab_size=target.vocab_size, draft_vocab_size=size)
    drafter.set_draft_vocab(vocab.to(drafter.d2t.device))
    return drafter


def _train_step(run: _Run, samples: list[Sample], lr: float) -> dict[str, Any]:
    """One AdamW update on one batch; returns the step's metrics."""
    cfg, target = run.cfg, run.target
    # pad_id is arbitrary: padded positions are neither attended to by real ones nor supervised
    batch = collate(samples, pad_id=0, max_length=cfg.max_seq_len).to(target.device)
    features, logits = target_features(target, batch.input_ids, batch.attention_mask)
    out = ttt_unroll(
        run.drafter,
        features,
        batch.input_ids,
        logits,
        batch.loss_mask,
        batch.attention_mask,
        steps=cfg.ttt_steps,
        decay=cfg.step_decay,
    )
    run.optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    params = [p for group in run.optimizer.param_groups for p in group["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf"))
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.optimizer.step()
    return {
        "loss": float(out.loss.detach()),
        "step_loss": [round(float(x), 5) for x in out.step_loss],
        "step_acc": [round(float(x), 5) for x in out.step_acc],
        "grad_norm": float(norm),
        "lr": lr,
    }


@dataclass
class _Run:
    """Mutable state of one ``train_sft`` call."""

    target: TargetModel
    cfg: SFTConfig
    out_dir: Path
    drafter: Eagle3Drafter
    optimizer: torch.optim.AdamW
    data_fingerprint: str
    step: int = 0
    elapsed_s: float = 0.0  # optimizer-step time only (held-out evaluation excluded)
    tau: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def evaluate(self, prompts: Sequence[Sequence[int]]) -> float | None:
        if not prompts:
            return None
        self.tau = heldout_tau(
            self.target,
            self.drafter,
            prompts,
            num_draft_tokens=self.cfg.eval_num_draft_tokens,
            max_new_tokens=self.cfg.eval_max_new_tokens,
        )
        return self.tau

    def log(self, record: dict[str, Any]) -> dict[str, Any]:
        line: dict[str, Any] = {"step": self.step, "loss": None, "step_acc": None}
        line.update(tau=None, lr=None)
        line.update(record, elapsed_s=round(self.elapsed_s, 4))
        with (self.out_dir / METRICS_FILE).open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(line) + "\n")
        self.history.append(line)
        return line

    def checkpoint(self) -> Path:
        config = self.cfg.to_dict()
        return save_training_checkpoint(
            self.out_dir / CHECKPOINT_DIR / f"step-{self.step:08d}",
            self.drafter,
            self.optimizer,
            step=self.step,
            elapsed_s=self.elapsed_s,
            extra={"config": config, "data_fingerprint": self.data_fingerprint},
            provenance={
                "kind": "sft",
                "step": self.step,
                "target_model": self.target.name,
                "sft_config": config,
            },
        )

    def advance(self, samples: list[Sample], prompts: Sequence[Sequence[int]]) -> dict[str, Any]:
        """Train one step, then log, evaluate and checkpoint on schedule."""
        cfg = self.cfg
        chosen = batch_indices(
            self.step, num_samples=len(samples), batch_size=cfg.batch_size, seed=cfg.seed
        )
        t0 = time.perf_counter()
        stats = _train_step(self, [samples[i] for i in chosen], cfg.lr_at(self.step))
        self.elapsed_s += time.perf_counter() - t0
        self.step += 1
        last = self.step == cfg.total_steps
        tau = self.evaluate(prompts) if last or _every(self.step, cfg.eval_every) else None
        line = self.log({**stats, "tau": tau})
        if last or _every(self.step, cfg.checkpoint_every):
            self.checkpoint()
        return line


def _every(step: int, period: int) -> bool:
    return period > 0 and step % period == 0


def _fingerprint(samples: Sequence[Sample]) -> str:
    """sha256 of the token ids, in order: a resume must see the same data."""
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(json.dumps([sample.prompt_ids, sample.response_ids]).encode())
    return digest.hexdigest()


def _start(
    target: TargetModel,
    samples: list[Sample],
    out_dir: Path,
    cfg: SFTConfig,
    drafter: Eagle3Drafter | None,
    resume: bool,
) -> _Run:
    latest = latest_checkpoint(out_dir)
    fingerprint = _fingerprint(samples)
    if latest is not None and not resume:
        raise ValueError(f"{out_dir} holds checkpoints of an earlier run; resume or use a new dir")
    if latest is None:
        (out_dir / METRICS_FILE).unlink(missing_ok=True)  # died before its first checkpoint
        model = _initial_drafter(target, samples, cfg, drafter).float().train()
        return _Run(target, cfg, out_dir, model, _make_optimizer(model, cfg), fingerprint)
    saved = json.loads((latest / STATE_FILE).read_text())
    _check_resume(saved, cfg, fingerprint, latest)
    if drafter is not None:
        logger.info("resuming from %s; the drafter argument is ignored", latest)
    model = resume_drafter(latest, target).train()
    run = _Run(target, cfg, out_dir, model, _make_optimizer(model, cfg), fingerprint)
    state = load_training_state(latest, run.optimizer)
    run.step, run.elapsed_s = int(state["step"]), float(state["elapsed_s"])
    truncate_metrics(out_dir / METRICS_FILE, run.step)
    logger.info("resumed SFT at step %d from %s", run.step, latest)
    return run


def train_sft(
    target: TargetModel,
    data: str | Path | Iterable[Sample],
    out_dir: str | Path,
    cfg: SFTConfig | None = None,
    *,
    drafter: Eagle3Drafter | None = None,
    resume: bool = True,
    progress: bool = True,
    eval_prompts: Sequence[Sequence[int]] | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> SFTResult:
    """Train an EAGLE-3 drafter with TTT on target-written samples; resumable.

    ``data`` is a ``regenerate`` output directory or an iterable of samples. ``drafter`` is the
    starting point of a fresh run (default: a seeded random drafter whose draft vocabulary is
    chosen from the data); it is converted to float32 in place. ``eval_prompts`` are held-out
    prompt id lists for tau. ``on_step`` gets each step's metrics line (progress reporting); an
    exception raised there stops the run, and a rerun resumes from the newest checkpoint.
    """
    cfg = cfg or SFTConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    samples = _load_samples(data)
    run = _start(target, samples, out, cfg, drafter, resume)
    resumed_from = run.step
    prompts = [list(p) for p in eval_prompts or []]
    if run.step == 0 and prompts:
        first = run.log({"tau": run.evaluate(prompts)})  # the starting point of the tau curve
        if on_step is not None:
            on_step(first)
    with tqdm(total=cfg.total_steps, initial=run.step, desc="sft", disable=not progress) as bar:
        while run.step < cfg.total_steps:
            line = run.advance(samples, prompts)
            bar.update(1)
            bar.set_postfix(loss=f"{line['loss']:.3f}", tau=run.tau)
            if on_step is not None:
                on_step(line)
    final = latest_checkpoint(out)
    assert final is not None
    return SFTResult(
        drafter=run.drafter,
        step=run.step,
        checkpoint=final,
        metrics_path=out / METRICS_FILE,
        resumed_from=resumed_from,
        tau=run.tau,
        history=run.history,
    )


def run_sft(
    target: str,
    data_dir: str | Path,
    out_dir: str | Path,
    config: SFTConfig | dict[str, Any],
    *,
    device: str = "cpu",
    dtype: str = "float32",
    eval_prompts_path: str | Path | None = None,
    eval_limit: int = 8,
    progress: bool = True,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> SFTResult:
    """Entry point for ``draftopd train sft`` and the trainer's Celery task: load the target by
    spec, render up to ``eval_limit`` held-out prompts from a prompts JSONL, train (resuming)."""
    cfg = config if isinstance(config, SFTConfig) else SFTConfig.from_dict(config)
    model = load_target(target, device=device, dtype=dtype)
    heldout = None
    if eval_prompts_path is not None:
        prompts = load_prompts(eval_prompts_path, limit=eval_limit)
        heldout = [render_prompt(model.tokenizer, p) for p in prompts]
    return train_sft(
        model, data_dir, out_dir, cfg, progress=progress, eval_prompts=heldout, on_step=on_step
    )


__all__ = [
    "SFTConfig",
    "SFTResult",
    "batch_indices",
    "choose_draft_vocab",
    "heldout_tau",
    "run_sft",
    "train_sft",
]
