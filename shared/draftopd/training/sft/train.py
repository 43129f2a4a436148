"""SFT bootstrap of a drafter (docs/draft_opd.md, "SFT bootstrap").

The drafter learns from target-regenerated samples with its family's SFT objective
(``Drafter.sft_loss``; for EAGLE-3, training-time test: 7 unrolled draft steps weighted 0.8^j,
soft cross-entropy to the target distribution over the draft vocabulary). The draft vocabulary is
the Vd most frequent target ids in the responses. AdamW with linear warmup and a cosine decay,
global gradient clipping. The target, and with it the shared embedding, stays frozen.

``out_dir`` is a run directory of ``training/run.py``; its metrics lines hold step, loss,
step_loss, step_acc, tau (eval steps only; step 0 is the initial drafter), lr, grad_norm and
elapsed_s (cumulative optimizer-step time, evaluation excluded). trainer_state.json also holds a
sha256 of the training samples.

Everything is safetensors or JSON; nothing is pickled. A rerun with ``resume=True`` continues
from the newest complete checkpoint: data order and learning rate are pure functions of the step,
so an interrupted run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from draftopd.models.checkpoint import check_compatible, random_drafter_for
from draftopd.models.drafter import Drafter
from draftopd.models.target import TargetModel
from draftopd.training.budget import StepTiming
from draftopd.training.configs import SFTConfig
from draftopd.training.data.batches import batch_indices, collate, target_features
from draftopd.training.data.features import FeatureCache, lm_head_weight
from draftopd.training.data.regenerate import Sample, iter_samples
from draftopd.training.run import METRICS_FILE, TrainingRun, check_resume, open_run
from draftopd.training.schedule import make_adamw, optimizer_step

logger = logging.getLogger(__name__)
HARD_OFF_LOGIT = -1e4  # every draft token but the top one: softmax gives exactly 0 there


@dataclass(frozen=True)
class SFTResult:
    drafter: Drafter  # the trained drafter (float32, on the target's device)
    step: int  # optimizer steps completed
    checkpoint: Path  # newest checkpoint directory (loadable with ``load_drafter``)
    metrics_path: Path  # the JSONL metrics log
    resumed_from: int  # the step this call started from (0 = fresh)
    tau: float | None  # the latest held-out tau (None without eval prompts)
    history: list[dict[str, Any]] = field(default_factory=list)  # lines this call logged


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


def load_samples(data: str | Path | Iterable[Sample]) -> list[Sample]:
    samples = list(iter_samples(data)) if isinstance(data, (str, Path)) else list(data)
    samples = [s for s in samples if s.response_ids]
    if not samples:
        raise ValueError("no training samples with a non-empty response")
    return samples


def _fingerprint(samples: Sequence[Sample]) -> str:
    """sha256 of the token ids, in order: a resume must see the same data."""
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(json.dumps([sample.prompt_ids, sample.response_ids]).encode())
    return digest.hexdigest()


def vocab_coverage(samples: Iterable[Sample], sizes: Sequence[int]) -> dict[int, float]:
    """Share of response tokens inside the ``size`` most frequent response ids, per size."""
    counts: dict[int, int] = {}
    for sample in samples:
        for token in sample.response_ids:
            counts[token] = counts.get(token, 0) + 1
    ranked = sorted(counts.values(), reverse=True)
    total = sum(ranked) or 1
    return {size: sum(ranked[:size]) / total for size in sizes}


def init_from_target(drafter: Drafter, target: TargetModel) -> None:
    """Copy the target's LM head rows of the draft vocabulary and its final norm into
    ``drafter`` (an EAGLE-3 drafter's output layer reads a hidden state of the same width)."""
    head = getattr(drafter, "lm_head", None)
    norm = getattr(drafter, "norm", None)
    final_norm = getattr(getattr(target.model, "model", None), "norm", None)
    d2t = getattr(drafter, "d2t", None)
    if head is None or norm is None or final_norm is None or d2t is None:
        raise ValueError("init_from_target needs a drafter with lm_head, norm and d2t")
    with torch.no_grad():
        head.weight.copy_(lm_head_weight(target)[d2t].to(head.weight))
        norm.weight.copy_(final_norm.weight.to(norm.weight))


def _initial_drafter(
    target: TargetModel, samples: list[Sample], cfg: SFTConfig, drafter: Drafter | None
) -> Drafter:
    if drafter is not None:  # e.g. continued SFT from a checkpoint: keep its draft vocabulary
        check_compatible(drafter.cfg, target)
        return drafter
    size = min(cfg.draft_vocab_size, target.vocab_size)
    options = {}
    if cfg.drafter_type == "dflash":
        options = {"block_size": cfg.block_size, "num_layers": cfg.drafter_layers}
    drafter = random_drafter_for(
        target, seed=cfg.seed, draft_vocab_size=size, architecture=cfg.drafter_type, **options
    )
    vocab = choose_draft_vocab(samples, vocab_size=target.vocab_size, draft_vocab_size=size)
    drafter.set_draft_vocab(vocab.to(drafter.d2t.device))
    if cfg.init_from_target:
        init_from_target(drafter, target)
    return drafter


def hard_targets(logits: torch.Tensor, drafter: Drafter, *, draft_vocab: bool) -> torch.Tensor:
    """Logits over the draft vocabulary whose softmax is one-hot at the target's top draft
    token: the soft cross-entropy against them is the hard cross-entropy to that token."""
    if not draft_vocab:
        logits = logits.index_select(-1, drafter.d2t)
    top = logits.argmax(-1, keepdim=True)
    return torch.full_like(logits, HARD_OFF_LOGIT, dtype=torch.float32).scatter_(-1, top, 0.0)


@dataclass
class _CachedTargets:
    """The feature cache and the target's LM head restricted to the drafter's vocabulary."""

    cache: FeatureCache
    head: torch.Tensor  # [Vd, H] float32, rows in d2t order


def _cached_targets(
    drafter: Drafter, target: TargetModel, data: str | Path | Iterable[Sample], features: Any
) -> _CachedTargets | None:
    """The feature cache of ``data`` with the LM head rows of ``drafter``'s vocabulary (None
    without a cache: the steps then run the target)."""
    if features is None:
        return None
    d2t = getattr(drafter, "d2t", None)
    if d2t is None:
        raise ValueError("the feature cache needs a drafter with a draft vocabulary (d2t)")
    head = lm_head_weight(target).detach()[d2t].float()
    if not isinstance(data, (str, Path)):
        raise ValueError("a feature cache needs the data as a regenerate directory")
    return _CachedTargets(FeatureCache(features, data, target), head)


def _open(
    out_dir: Path,
    target: TargetModel,
    samples: list[Sample],
    cfg: SFTConfig,
    drafter: Drafter | None,
    *,
    resume: bool,
    label: str,
    check_saved: Callable[[dict[str, Any], Path], None],
    eval_prompts: Sequence[Sequence[int]] | None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> TrainingRun:
    """``open_run`` with SFT's fresh drafter and AdamW."""
    return open_run(
        out_dir,
        target,
        cfg,
        resume=resume,
        label=label,
        fresh_drafter=lambda: _initial_drafter(target, samples, cfg, drafter),
        make_optimizer=lambda d: make_adamw(
            d, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
        ),
        check_saved=check_saved,
        eval_prompts=[list(p) for p in eval_prompts or []],
        on_step=on_step,
    )


def time_sft(
    target: TargetModel,
    data: str | Path,
    cfg: SFTConfig,
    *,
    features: str | Path | None = None,
    eval_prompts: Sequence[Sequence[int]] | None = None,
    steps: int = 6,
) -> tuple[StepTiming, Any]:
    """This machine's seconds per optimizer step of ``cfg`` and per held-out evaluation
    (``training/budget.py``): a throwaway drafter, as a fresh run would start, trained for
    ``steps`` steps on the run's first batches and then again on the same batches, timed the
    second time, in a scratch directory; then evaluated twice (the first evaluation includes
    the target's one-off pass over the held-out prompts). The first pass is not timed because
    each new batch shape costs a one-off kernel compilation (oneDNN's JIT under bf16 autocast):
    timed cold, 20 steps of the recipe on the EPYC took 1.54-1.60 s against the 1.30 s a step
    of the whole run took.
    Returns the timing and that evaluator (None in engine mode), which ``train_sft`` can reuse."""
    samples = load_samples(data)
    with tempfile.TemporaryDirectory(prefix="draftopd-time-") as scratch:
        run = _open(
            Path(scratch), target, samples, cfg, None, resume=False, label="timing",
            check_saved=lambda saved, where: None, eval_prompts=eval_prompts,
        )  # fmt: skip
        cached = _cached_targets(run.drafter, target, data, features)
        seconds = []
        for step in [*range(steps), *range(steps)]:  # the second pass is timed
            run.step = step
            t0 = time.perf_counter()
            _train_step(run, cfg, samples, cached)
            seconds.append(time.perf_counter() - t0)
        evals = []
        for _ in range(2):
            t0 = time.perf_counter()
            run.evaluate()
            evals.append(time.perf_counter() - t0)
    timing = StepTiming(step_s=sum(seconds[steps:]) / steps, first_eval_s=evals[0], eval_s=evals[1])
    return timing, run.evaluator


def native_bf16(device: torch.device) -> bool:
    """Does ``device`` multiply bfloat16 natively? CUDA: the GPU says. CPU: AVX512-BF16 or AMX
    (without them torch emulates bf16 products, and an autocast step of the recipe measured
    about 2.7x slower than float32 on an AVX-512 Xeon without BF16)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def autocast_on(choice: str, device: torch.device) -> bool:
    """Whether ``SFTConfig.autocast`` runs the drafter under bfloat16 autocast on ``device``."""
    return choice == "bfloat16" or (choice == "auto" and native_bf16(device))


def _train_step(
    run: TrainingRun,
    cfg: SFTConfig,
    samples: list[Sample],
    cached: _CachedTargets | None,
) -> dict[str, Any]:
    """One AdamW update on the batch of step ``run.step`` (a pure function of the step, so a
    resumed run sees the same batches); returns the step's metrics."""
    target, lr = run.target, cfg.lr_at(run.step)
    chosen = batch_indices(
        run.step, num_samples=len(samples), batch_size=cfg.batch_size, seed=cfg.seed
    )
    samples = [samples[i] for i in chosen]
    # pad_id is arbitrary: padded positions are neither attended to by real ones nor supervised
    batch = collate(samples, pad_id=0, max_length=cfg.max_seq_len).to(target.device)
    if cached is None:
        features, logits = target_features(target, batch.input_ids, batch.attention_mask)
    else:  # the cache's logits are over the draft vocabulary already
        features, logits = cached.cache.batch(
            samples, max_seq_len=cfg.max_seq_len, head=cached.head
        )
    draft_vocab = cached is not None
    if cfg.sft_target == "hard":
        logits, draft_vocab = hard_targets(logits, run.drafter, draft_vocab=draft_vocab), True
    enabled = autocast_on(cfg.autocast, target.device)
    with torch.autocast(target.device.type, dtype=torch.bfloat16, enabled=enabled):
        out = run.drafter.sft_loss(
            features,
            batch.input_ids,
            logits,
            batch.loss_mask,
            batch.attention_mask,
            slots=cfg.ttt_steps,
            decay=cfg.step_decay,
            draft_vocab_logits=draft_vocab,
            max_anchors=cfg.block_anchors,
            generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + run.step),
        )
    norm = optimizer_step(run.optimizer, out.loss, lr=lr, grad_clip=cfg.grad_clip)
    return {
        "loss": float(out.loss.detach()),
        "step_loss": [round(float(x), 5) for x in out.step_loss],
        "step_acc": [round(float(x), 5) for x in out.step_acc],
        "grad_norm": norm,
        "lr": lr,
    }


def train_sft(
    target: TargetModel,
    data: str | Path | Iterable[Sample],
    out_dir: str | Path,
    cfg: SFTConfig | None = None,
    *,
    drafter: Drafter | None = None,
    resume: bool = True,
    progress: bool = True,
    eval_prompts: Sequence[Sequence[int]] | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    features: str | Path | None = None,
    evaluator: Any = None,
) -> SFTResult:
    """Train a drafter on target-written samples; resumable.

    ``data`` is a ``regenerate`` output directory or an iterable of samples. ``drafter`` is the
    starting point of a fresh run (default: a seeded random EAGLE-3 drafter whose draft vocabulary
    is chosen from the data); it is converted to float32 in place. ``eval_prompts`` are held-out
    prompt id lists for tau. ``on_step`` gets each step's metrics line (progress reporting); an
    exception raised there stops the run, and a rerun resumes from the newest checkpoint.
    ``features`` is the feature-cache directory of the data directory ``data``
    (``build_feature_cache``): the steps then read it instead of running the target.
    ``evaluator`` is a held-out evaluator of the same prompts and settings built earlier
    (``time_sft``), so the target's one-off pass over the held-out prompts is not repeated.
    """
    cfg = cfg or SFTConfig()
    samples = load_samples(data)
    fingerprint = _fingerprint(samples)

    def check_saved(saved: dict[str, Any], where: Path) -> None:
        check_resume(saved, cfg, where, extendable=True)
        if saved.get("data_fingerprint") != fingerprint:
            raise ValueError(f"cannot resume {where}: the training samples differ from that run's")
        if drafter is not None:
            logger.info("resuming from %s; the drafter argument is ignored", where)

    run = _open(
        Path(out_dir), target, samples, cfg, drafter, resume=resume, label="SFT",
        check_saved=check_saved, eval_prompts=eval_prompts, on_step=on_step,
    )  # fmt: skip
    run.evaluator = run.evaluator or evaluator
    provenance = {"kind": "sft", "target_model": target.name, "sft_config": cfg.to_dict()}
    cached = _cached_targets(run.drafter, target, data, features)
    if cfg.autocast == "auto":
        on = autocast_on(cfg.autocast, target.device)
        logger.info("autocast auto: %s on %s", "bfloat16" if on else "off", target.device)
    run.start()
    with tqdm(total=cfg.total_steps, initial=run.step, desc="sft", disable=not progress) as bar:
        while not run.done:
            t0 = time.perf_counter()
            stats = _train_step(run, cfg, samples, cached)
            run.elapsed_s += time.perf_counter() - t0
            run.step += 1
            run.finish_step(stats, extra={"data_fingerprint": fingerprint}, provenance=provenance)
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.3f}", tau=run.tau)
    return SFTResult(
        drafter=run.drafter,
        step=run.step,
        checkpoint=run.checkpoint,
        metrics_path=run.out_dir / METRICS_FILE,
        resumed_from=run.resumed_from,
        tau=run.tau,
        history=run.history,
    )


__all__ = [
    "SFTConfig",
    "SFTResult",
    "autocast_on",
    "choose_draft_vocab",
    "hard_targets",
    "init_from_target",
    "load_samples",
    "native_bf16",
    "time_sft",
    "train_sft",
    "vocab_coverage",
]
